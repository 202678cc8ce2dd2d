"""Reporting the training runs: a table, CSV and JSON files, and PNG charts (matplotlib)."""

import csv
import json
import os
import re
import statistics

from ..functional import resolve_k

TABLE_COLUMNS = (
    "setting",
    "test acc % (mean ± std)",
    "vs dense (points)",
    "backward s/epoch",
    "speedup",
    "hidden widths",
    "params",
)


def _widths_text(widths) -> str:
    return "/".join(f"{w:.0f}" for w in widths)


def table_rows(summaries) -> list[list[str]]:
    rows = []
    for s in summaries:
        gap = s.get("gap_to_dense")
        speedup = s.get("speedup")
        rows.append(
            [
                s["label"],
                f"{s['test_acc_mean']:.2f} ± {s['test_acc_std']:.2f}",
                "baseline"
                if s["config"]["mode"] == "dense"
                else ("n/a" if gap is None else f"{gap:+.2f}"),
                f"{s['backward_s_mean']:.3f}",
                "n/a" if speedup is None else f"{speedup:.2f}×",
                _widths_text(s["widths_mean"]),
                f"{s['params_mean']:,.0f}",
            ]
        )
    return rows


def format_table(summaries) -> str:
    """A Markdown table (also readable as plain text) of the summaries."""
    return format_markdown_table(TABLE_COLUMNS, table_rows(summaries))


def format_markdown_table(header, body) -> str:
    """A Markdown table (also readable as plain text): ``header`` cells, then ``body`` rows."""
    rows = [list(header)] + [list(row) for row in body]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]

    def line(cells):
        return "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"

    separator = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(rows[0]), separator] + [line(r) for r in rows[1:]])


CSV_FIELDS = (
    "label",
    "mode",
    "k",
    "optimizer",
    "lr",
    "eps",
    "sparse_grad",
    "simplify",
    "threshold",
    "hidden",
    "layers",
    "epochs",
    "batch_size",
    "seeds",
    "device",
    "test_acc_mean",
    "test_acc_std",
    "gap_to_dense",
    "backward_s_mean",
    "backward_s_std",
    "speedup",
    "epoch_s_mean",
    "initial_widths",
    "widths_mean",
    "params_mean",
)


def write_csv(path, summaries) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        for s in summaries:
            c = s["config"]
            writer.writerow(
                dict(
                    label=s["label"],
                    mode=c["mode"],
                    k=c["k"] if c["mode"] != "dense" else "",
                    optimizer=c["optimizer"],
                    lr=c["lr"] if c["lr"] is not None else "",
                    eps=c["eps"] if c.get("eps") is not None else "",
                    sparse_grad=c["sparse_grad"],
                    simplify=c["simplify"],
                    threshold=c["threshold"] if c["simplify"] else "",
                    hidden=c["hidden"],
                    layers=c["layers"],
                    epochs=c["epochs"],
                    batch_size=c["batch_size"],
                    seeds=" ".join(map(str, s["seeds"])),
                    device=s["device"],
                    test_acc_mean=f"{s['test_acc_mean']:.4f}",
                    test_acc_std=f"{s['test_acc_std']:.4f}",
                    gap_to_dense=""
                    if s.get("gap_to_dense") is None
                    else f"{s['gap_to_dense']:.4f}",
                    backward_s_mean=f"{s['backward_s_mean']:.6f}",
                    backward_s_std=f"{s['backward_s_std']:.6f}",
                    speedup="" if s.get("speedup") is None else f"{s['speedup']:.4f}",
                    epoch_s_mean=f"{s['epoch_s_mean']:.6f}",
                    initial_widths=" ".join(map(str, s["initial_widths"])),
                    widths_mean=" ".join(f"{w:.1f}" for w in s["widths_mean"]),
                    params_mean=f"{s['params_mean']:.0f}",
                )
            )


def write_json(path, payload) -> None:
    with open(path, "w") as f:
        json.dump(payload, f, indent=1)


# ---- charts -------------------------------------------------------------------------------


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, path) -> bool:
    """Lays out, writes (PNG, 120 dpi) and closes ``fig``; True, for the chart writers."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _integer_ticks(axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _k_percent(summary) -> float:
    c = summary["config"]
    if c["mode"] == "dense":
        return 100.0
    return 100.0 * resolve_k(c["k"], c["hidden"]) / c["hidden"]


def _by_optimizer(summaries, predicate):
    groups = {}
    for s in summaries:
        if predicate(s):
            groups.setdefault(s["config"]["optimizer"], []).append(s)
    return groups


def _series_name(summary) -> str:
    """The label without its k: the runs that differ only in k form one curve."""
    return re.sub(r" k=\d+", "", summary["label"])


def _k_series(summaries, predicate=lambda s: True):
    """{curve name: runs sorted by k} for the meProp runs (no meSimp) that pass ``predicate``."""
    curves = {}
    for s in summaries:
        c = s["config"]
        if c["mode"] != "dense" and not c["simplify"] and predicate(s):
            curves.setdefault(_series_name(s), []).append(s)
    return {name: sorted(runs, key=_k_percent) for name, runs in curves.items()}


def chart_accuracy_vs_k(path, summaries) -> bool:
    """Test accuracy against k (% of the hidden width) per setting; dense baselines as lines."""
    series = _k_series(summaries)
    if not series:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 5))
    singles = 0
    for name, pts in series.items():
        xs = [_k_percent(s) for s in pts]
        if len(pts) == 1:  # single points at the same k: spread them a little to stay visible
            xs = [xs[0] * 1.035 ** (singles - 3)]
            singles += 1
        ax.errorbar(
            xs,
            [s["test_acc_mean"] for s in pts],
            yerr=[s["test_acc_std"] for s in pts],
            marker="o",
            capsize=3,
            label=name,
            linestyle="-" if len(pts) > 1 else "none",
        )
    dense = [s for s in summaries if s["config"]["mode"] == "dense"]
    for i, s in enumerate(sorted(dense, key=lambda s: s["test_acc_mean"])):
        ax.axhline(s["test_acc_mean"], linestyle="--", linewidth=1, color="gray")
        ax.annotate(
            f"{s['label']} {s['test_acc_mean']:.2f}%",
            (0.01 + 0.3 * i, s["test_acc_mean"]),
            xycoords=("axes fraction", "data"),
            ha="left",
            va="bottom",
            fontsize=8,
            color="gray",
        )
    ax.set_xscale("log")
    ax.set_xlabel("k (% of hidden width kept in backward, log scale)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_title("Test accuracy against k (mean ± std over seeds; dashed: dense)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    return save_figure(fig, path)


def chart_backward_vs_k(path, summaries, benchmark=None) -> bool:
    """Backward time per epoch of the trained MLP against k (left) and, if a layer benchmark
    was run, the backward speedup of one large layer against k (right)."""
    # Curves with at least two k; single points are in the table.
    series = [(name, pts) for name, pts in _k_series(summaries).items() if len(pts) > 1]
    if not series and not benchmark:
        return False
    plt = _pyplot()
    panels = 2 if (series and benchmark) else 1
    fig, axes = plt.subplots(1, panels, figsize=(6.5 * panels, 4.5), squeeze=False)
    axes = list(axes[0])
    if series:
        ax = axes.pop(0)
        for name, pts in series:
            ax.plot(
                [_k_percent(s) for s in pts],
                [s["backward_s_mean"] for s in pts],
                marker="o",
                label=name,
            )
        optimizers = {pts[0]["config"]["optimizer"] for _, pts in series}
        for s in summaries:
            if s["config"]["mode"] == "dense" and s["config"]["optimizer"] in optimizers:
                ax.axhline(
                    s["backward_s_mean"],
                    linestyle="--",
                    linewidth=1,
                    color="gray",
                    label=s["label"],
                )
        c = series[0][1][0]["config"]
        ax.set_xscale("log")
        ax.set_ylim(bottom=0)
        ax.set_xlabel("k (% of hidden width, log scale)")
        ax.set_ylabel("time in loss.backward() per epoch (s)")
        ax.set_title(f"MLP training: hidden {c['hidden']}, batch {c['batch_size']}", fontsize=10)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    if benchmark:
        ax = axes.pop(0)
        for mode in ("unified", "per_example"):
            rows = sorted((r for r in benchmark if r["mode"] == mode), key=lambda r: r["k_ratio"])
            if rows:
                ax.plot(
                    [100 * r["k_ratio"] for r in rows],
                    [r["speedup"] for r in rows],
                    marker="o",
                    label=f"meProp {mode.replace('_', '-')} (row-sparse grad)",
                )
        ax.axhline(1.0, linestyle="--", linewidth=1, color="gray", label="dense nn.Linear")
        r0 = benchmark[0]
        ax.set_xscale("log")
        ax.set_xlabel("k (% of layer width, log scale)")
        ax.set_ylabel("backward speedup over dense (×)")
        ax.set_title(
            f"One {r0['width']}×{r0['width']} layer, batch {r0['batch']}, "
            f"{r0['device']} (dense {1e3 * r0['backward_s']:.1f} ms)",
            fontsize=10,
        )
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle("Backward time and speedup against k")
    return save_figure(fig, path)


def chart_widths(path, summaries) -> bool:
    """Hidden widths through training for meSimp runs (each layer, mean over seeds)."""
    simplified = [s for s in summaries if s["config"]["simplify"]]
    if not simplified:
        return False
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for s in simplified:
        runs = s["runs"]
        n_layers = len(s["initial_widths"])
        for layer in range(n_layers):
            curve = [s["initial_widths"][layer]] + [
                statistics.fmean(r["epochs"][e]["widths"][layer] for r in runs)
                for e in range(len(runs[0]["epochs"]))
            ]
            ax.plot(
                range(len(curve)),
                curve,
                marker=".",
                label=f"{s['label']}: hidden layer {layer + 1}",
            )
    ax.set_yscale("log")
    _integer_ticks(ax.xaxis)
    ax.set_xlabel("epoch (0: before training)")
    ax.set_ylabel("hidden width (neurons, log scale)")
    ax.set_title("meSimp: hidden width through training (mean over seeds)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return save_figure(fig, path)


def chart_loss_curves(path, summaries) -> bool:
    """Training loss per epoch (mean over seeds), one panel per optimizer."""
    groups = _by_optimizer(summaries, lambda s: True)
    if not groups:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(6.5 * len(groups), 4.5), squeeze=False)
    for ax, (opt, group) in zip(axes[0], sorted(groups.items())):
        for s in group:
            runs = s["runs"]
            curve = [
                statistics.fmean(r["epochs"][e]["train_loss"] for r in runs)
                for e in range(len(runs[0]["epochs"]))
            ]
            ax.plot(
                range(1, len(curve) + 1),
                curve,
                label=s["label"],
                linestyle="--" if s["config"]["mode"] == "dense" else "-",
            )
        ax.set_yscale("log")
        _integer_ticks(ax.xaxis)
        ax.set_xlabel("epoch")
        ax.set_ylabel("training loss (cross-entropy, log scale)")
        ax.set_title(f"Training loss, {opt} (mean over seeds)")
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=7)
    return save_figure(fig, path)


def write_report(out_dir, summaries, *, extra=None, benchmark=None, meta=None) -> dict:
    """Writes results.json, results.csv, table.md and the PNG charts into ``out_dir``.

    ``summaries``: the table's rows (``train.run_experiment``); ``extra``: more summaries that
    feed the charts only (a k sweep); ``benchmark``: ``train.benchmark_backward`` rows.
    Returns ``{name: path}`` of what was written.
    """
    os.makedirs(out_dir, exist_ok=True)
    extra = list(extra or [])
    written = {}
    path = os.path.join(out_dir, "results.json")
    write_json(
        path, dict(meta=meta or {}, table=summaries, k_sweep=extra, layer_benchmark=benchmark or [])
    )
    written["json"] = path
    path = os.path.join(out_dir, "results.csv")
    write_csv(path, list(summaries) + extra)
    written["csv"] = path
    path = os.path.join(out_dir, "table.md")
    with open(path, "w") as f:
        f.write(format_table(summaries) + "\n")
    written["table"] = path
    everything = list(summaries) + extra
    charts = {
        "accuracy_vs_k": lambda p: chart_accuracy_vs_k(p, everything),
        "backward_vs_k": lambda p: chart_backward_vs_k(p, everything, benchmark),
        "hidden_width": lambda p: chart_widths(p, summaries),
        "loss_curves": lambda p: chart_loss_curves(p, summaries),
    }
    for name, draw in charts.items():
        path = os.path.join(out_dir, f"{name}.png")
        if draw(path):
            written[name] = path
    return written
