"""Charts from the sweep CSV: speedup against k, per-kernel time breakdown, roofline view.

``python -m triton_mebp plot`` (or ``perf/plot.py``) reads ``perf/results/sweep-*.csv`` and writes, per
device, into ``perf/charts/``:

- ``speedup-DEVICE.png``: speedup of meProp over dense for the backward pass (top row) and the
  full training step with SGD (bottom row) against k, one column per shape, the ideal ``N / k``
  dashed;
- ``breakdown-DEVICE.png``: time of each kernel of one backward + update (selection, gathered
  products, row update) next to the dense GEMMs, at the k nearest 5%;
- ``roofline-DEVICE.png``: achieved FLOP rate against arithmetic intensity for every kernel, under
  the device's measured copy bandwidth and matmul rate.
"""

import csv
import glob
import re
import sys
from collections import defaultdict
from pathlib import Path

KERNEL_ORDER = ("select", "input_grad", "weight_grad", "update")


def load(paths, skipped=None) -> list[dict]:
    """Rows of the sweep CSVs (older layouts read too); a file of another kind (or not CSV text)
    is named and left out: printed, or appended to ``skipped`` if given."""
    from .harness import read_rows

    rows = []
    for path in paths:
        try:
            rows += read_rows(path)
        except (ValueError, csv.Error) as error:  # UnicodeDecodeError is a ValueError
            reason = f"{path} is not a sweep CSV ({' '.join(str(error).split())})"
            if skipped is None:
                print(f"mebp plot: {reason}; skipped", file=sys.stderr)
            else:
                skipped.append(reason)
    return rows


def latest_per_device(rows):
    """Per device, the rows of its most recent commit (a CSV may hold several)."""
    newest = {}
    for r in rows:
        if r["device"] not in newest or r["timestamp"] > newest[r["device"]][1]:
            newest[r["device"]] = (r["commit"], r["timestamp"])
    return {
        device: [r for r in rows if r["device"] == device and r["commit"] == commit]
        for device, (commit, _) in newest.items()
    }


def slug(device: str) -> str:
    if device.startswith("cpu"):
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", device.lower()).strip("-")


def _shape(r):
    return int(r["batch"]), int(r["in_features"]), int(r["out_features"])


def speedups(rows, metric):
    """{(shape, dtype, provider, mode, grad): [(k ratio, speedup, low, high)]} against dense.

    ``low``/``high`` combine the quantiles: dense q20 over meProp q80, dense q80 over meProp q20.
    """
    dense = {
        (_shape(r), r["dtype"]): r
        for r in rows
        if r["kernel"] == "layer" and r["provider"] == "dense" and r["metric"] == metric
    }
    curves = defaultdict(list)
    for r in rows:
        if r["kernel"] != "layer" or r["provider"] == "dense" or r["metric"] != metric:
            continue
        base = dense.get((_shape(r), r["dtype"]))
        if base is None:
            continue
        ratio = int(r["k"]) / int(r["out_features"])
        curves[(_shape(r), r["dtype"], r["provider"], r["mode"], r["grad"])].append(
            (
                ratio,
                float(base["median_ms"]) / float(r["median_ms"]),
                float(base["q20_ms"]) / float(r["q80_ms"]),
                float(base["q80_ms"]) / float(r["q20_ms"]),
            )
        )
    return {key: sorted(points) for key, points in curves.items()}


def _plt():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _plain_log_ticks(ax, xs):
    """Ticks at the measured k ratios and plain numbers on a log-log panel."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    if xs:
        ax.set_xticks(xs)
        ax.set_xticklabels([f"{x:.3g}" for x in xs], fontsize=7)
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.yaxis.set_major_formatter(ScalarFormatter())
    ax.yaxis.set_minor_formatter(NullFormatter())


def plot_speedup(rows, device, path):
    plt = _plt()
    shapes = sorted({_shape(r) for r in rows if r["kernel"] == "layer"})
    metrics = [m for m in ("backward", "step-sgd") if speedups(rows, m)]
    if not shapes or not metrics:
        return None
    fig, axes = plt.subplots(
        len(metrics), len(shapes), figsize=(4.2 * len(shapes), 3.6 * len(metrics)), squeeze=False
    )
    for i, metric in enumerate(metrics):
        curves = speedups(rows, metric)
        for j, shape in enumerate(shapes):
            ax = axes[i][j]
            ks = sorted({p[0] for key, pts in curves.items() if key[0] == shape for p in pts})
            if ks and metric == "backward":
                ax.plot(ks, [1 / k for k in ks], "k--", lw=0.8, label="ideal N/k")
            for key, points in sorted(curves.items()):
                if key[0] != shape:
                    continue
                _, dtype, provider, mode, grad = key
                x = [p[0] for p in points]
                ax.errorbar(
                    x,
                    [p[1] for p in points],
                    yerr=[
                        [max(p[1] - p[2], 0) for p in points],
                        [max(p[3] - p[1], 0) for p in points],
                    ],
                    marker="o",
                    ms=3,
                    capsize=2,
                    label=f"{provider} {mode} {grad} {dtype}",
                )
            ax.axhline(1.0, color="grey", lw=0.6)
            ax.set_xscale("log")
            ax.set_yscale("log")
            _plain_log_ticks(ax, ks)
            ax.set_xlabel("k / out_features")
            ax.set_ylabel(f"{metric} speedup vs dense")
            ax.set_title(f"B={shape[0]}, in={shape[1]}, out={shape[2]}", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=6)
    fig.suptitle(f"meProp speedup over dense: {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_breakdown(rows, device, path, target=0.05):
    """Stacked kernel times per provider and mode, one panel per shape, at the k nearest target."""
    plt = _plt()
    kernel_rows = [r for r in rows if r["kernel"] in KERNEL_ORDER]
    shapes = sorted({(_shape(r), r["dtype"]) for r in kernel_rows})
    if not shapes:
        return None
    cols = min(4, len(shapes))
    rows_of_panels = -(-len(shapes) // cols)
    fig, axes = plt.subplots(
        rows_of_panels, cols, figsize=(3.6 * cols + 1, 4.6 * rows_of_panels), squeeze=False
    )
    for ax in axes.flat[len(shapes) :]:
        ax.set_visible(False)
    for ax, (shape, dtype) in zip(axes.flat, shapes):
        of_shape = [r for r in kernel_rows if _shape(r) == shape and r["dtype"] == dtype]
        ratios = sorted({int(r["k"]) / shape[2] for r in of_shape if r["provider"] != "dense"})
        chosen = min(ratios, key=lambda x: abs(x - target)) if ratios else None
        groups = defaultdict(dict)
        for r in of_shape:
            if r["provider"] != "dense" and int(r["k"]) / shape[2] != chosen:
                continue
            name = (
                "dense"
                if r["provider"] == "dense"
                else f"{r['provider']}\n{r['mode']}\n{r['grad']}"
            )
            groups[name][r["kernel"]] = float(r["median_ms"])
        names = sorted(groups, key=lambda n: (n != "dense", n))
        bottoms = [0.0] * len(names)
        for kernel in KERNEL_ORDER:
            heights = [groups[n].get(kernel, 0.0) for n in names]
            ax.bar(range(len(names)), heights, bottom=bottoms, label=kernel)
            bottoms = [b + h for b, h in zip(bottoms, heights)]
        ax.set_xticks(range(len(names)))
        ax.set_xticklabels(names, fontsize=6)
        ax.set_ylabel("ms (stacked)")
        k_text = f", k={chosen:.3g} N" if chosen is not None else ""
        ax.set_title(f"B={shape[0]}, in={shape[1]}, out={shape[2]}, {dtype}{k_text}", fontsize=8)
        ax.legend(fontsize=6)
    fig.suptitle(f"one backward + update, per kernel: {device}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def ceilings(rows):
    """(bandwidth GB/s, {dtype: TFLOP/s}) measured by the sweep, best of the rows."""
    bandwidth = max(
        (float(r["gbps"]) for r in rows if r["kernel"] == "copy" and r["gbps"]), default=None
    )
    rates = defaultdict(float)
    for r in rows:
        if r["kernel"] == "matmul" and r["tflops"]:
            rates[r["dtype"]] = max(rates[r["dtype"]], float(r["tflops"]))
    return bandwidth, dict(rates)


def plot_roofline(rows, device, path):
    plt = _plt()
    points = [
        r
        for r in rows
        if r["kernel"] in KERNEL_ORDER + ("reduced_gemm", "layer") and r["tflops"] and r["gbps"]
    ]
    if not points:
        return None
    bandwidth, rates = ceilings(rows)
    fig, ax = plt.subplots(figsize=(7, 5))
    markers = {
        "select": "v",
        "input_grad": "o",
        "weight_grad": "s",
        "update": "^",
        "reduced_gemm": "D",
        "layer": "*",
    }
    colors = {"dense": "tab:gray", "mebp-torch": "tab:blue", "mebp-triton": "tab:red"}
    seen = set()
    for r in points:
        flops_rate = float(r["tflops"]) * 1e12
        intensity = flops_rate / (float(r["gbps"]) * 1e9)
        label = f"{r['provider']} {r['kernel']}"
        ax.scatter(
            intensity,
            flops_rate / 1e12,
            marker=markers[r["kernel"]],
            color=colors.get(r["provider"], "k"),
            s=18,
            alpha=0.7,
            label=None if label in seen else label,
        )
        seen.add(label)
    intensities = [float(r["tflops"]) * 1e3 / float(r["gbps"]) for r in points]
    lo, hi = min(intensities) / 2, max(intensities) * 2
    if bandwidth:
        for dtype, rate in rates.items():
            ridge = rate * 1e3 / bandwidth
            xs = [lo, ridge, max(hi, ridge * 2)]
            ax.plot(
                xs,
                [min(x * bandwidth / 1e3, rate) for x in xs],
                lw=1,
                label=f"ceiling {dtype}: {bandwidth:.0f} GB/s, {rate:.3g} TFLOP/s",
            )
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("arithmetic intensity (FLOP / byte)")
    ax.set_ylabel("achieved TFLOP/s")
    ax.set_title(f"roofline: {device}", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> int:
    from ..app.cli import CommandParser

    parser = CommandParser(prog="mebp plot", description=__doc__.split("\n")[0])
    parser.add_argument(
        "csv", nargs="*", type=Path, help="sweep CSVs (default perf/results/sweep-*.csv)"
    )
    parser.add_argument("--out", type=Path, default=Path("perf/charts"), help="folder for the PNGs")
    parser.add_argument(
        "--all-commits",
        action="store_true",
        help="plot every commit's rows, not only each device's latest",
    )
    args = parser.parse_args(argv)
    paths = args.csv or [Path(p) for p in sorted(glob.glob("perf/results/sweep-*.csv"))]
    missing = [p for p in paths if not p.is_file()]
    if not paths or missing:
        print(
            f"mebp plot: no sweep CSV found ({', '.join(map(str, missing)) or 'perf/results/sweep-*.csv'}); "
            "run `mebp sweep` first",
            file=sys.stderr,
        )
        return 2
    skipped = []
    rows = load(paths, skipped)
    if not rows:
        why = f": {'; '.join(skipped)}" if skipped else ""
        print(f"mebp plot: {', '.join(map(str, paths))} hold no sweep rows{why}", file=sys.stderr)
        return 2
    for reason in skipped:
        print(f"mebp plot: {reason}; skipped", file=sys.stderr)
    if args.all_commits:
        by_device = defaultdict(list)
        for r in rows:
            by_device[r["device"]].append(r)
    else:
        by_device = latest_per_device(rows)
    args.out.mkdir(parents=True, exist_ok=True)
    written = []
    for device, device_rows in sorted(by_device.items()):
        name = slug(device)
        for kind, draw in (
            ("speedup", plot_speedup),
            ("breakdown", plot_breakdown),
            ("roofline", plot_roofline),
        ):
            result = draw(device_rows, device, args.out / f"{kind}-{name}.png")
            if result is not None:
                written.append(result)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
