"""Where per-example meProp's own products stop paying: the predicted break-even k.

The per-example products stream one row of ``W`` (for dx) and one row of ``x`` (for dW) per
selected (example, column) entry, so their cost grows with ``B·k·M``, off the tensor cores.
The same gradient by dense GEMMs on the masked ``dy`` costs about the dense backward at any k.
For each shape this writes, from the cost model (``triton_mebp.estimate``), the smallest k at
which the masked-dense backward is predicted no slower (``break_even_k``) and the smallest k at
which ``MeLinear(mode="per_example", auto=True)`` switches to it (``auto_dense_from_k``, with
the default margin of ``estimate.masked_dense_is_faster``). CUDA rows come from the nominal H100
figures (no GPU has measured them: predictions), CPU rows from the speed model shipped with the
package (fitted to the committed CPU sweep).

``--measure`` also times, on this machine's CPU, the per-example layer backward both ways at
several k around the CPU prediction (B = 512, M = N = 4096, fp32, row-sparse gradient, interleaved
rounds): whether the shipped model's break-even holds.

    python perf/per_example_break_even.py [--out perf/results/per-example-break-even.csv]
    python perf/per_example_break_even.py --measure [--threads 2]
"""

import argparse
import csv
import os
from pathlib import Path

import torch

from triton_mebp import estimate
from triton_mebp.bench import harness
from triton_mebp.functional import _mebp_linear

# (device, dtype, batch, in_features, out_features, grad)
CASES = [
    ("cuda", torch.bfloat16, 4096, 8192, 8192, "dense"),
    ("cuda", torch.bfloat16, 4096, 8192, 8192, "sparse"),
    ("cuda", torch.bfloat16, 512, 4096, 4096, "dense"),
    ("cpu", torch.float32, 512, 4096, 4096, "sparse"),
    ("cpu", torch.float32, 512, 4096, 4096, "dense"),
    ("cpu", torch.float32, 128, 1024, 1024, "sparse"),
]
COLUMNS = [
    "model",
    "device",
    "dtype",
    "batch",
    "in_features",
    "out_features",
    "grad",
    "break_even_k",
    "break_even_pct",
    "auto_dense_from_k",
    "auto_dense_from_pct",
    "dense_ms",
    "per_example_ms_at_5pct",
    "masked_dense_ms_at_5pct",
    "source",
]


def smallest_k(width, loses):
    """The smallest k in [1, width] with ``loses(k)`` true (monotone in k), else width + 1."""
    low, high = 1, width + 1
    while low < high:
        middle = (low + high) // 2
        if loses(middle):
            high = middle
        else:
            low = middle + 1
    return low


def case_row(device, dtype, B, M, N, grad):
    def predict(k):
        return estimate.estimate(B, M, N, k, "per_example", device, dtype=dtype, grad=grad)

    def masked_no_slower(k):
        e = predict(k)
        return e.masked_dense_ms <= e.mebp_ms

    def auto_dense(k):
        return estimate.masked_dense_is_faster(B, M, N, k, device, dtype=dtype, grad=grad)

    # k = N runs the dense backward in both cases: search below it
    even, switch = smallest_k(N - 1, masked_no_slower), smallest_k(N - 1, auto_dense)
    at5 = predict(0.05)
    return dict(
        model=at5.model,
        device=device,
        dtype=str(dtype).removeprefix("torch."),
        batch=B,
        in_features=M,
        out_features=N,
        grad=grad,
        break_even_k=even,
        break_even_pct=round(100 * even / N, 2),
        auto_dense_from_k=switch,
        auto_dense_from_pct=round(100 * switch / N, 2),
        dense_ms=round(at5.dense_ms, 4),
        per_example_ms_at_5pct=round(at5.mebp_ms, 4),
        masked_dense_ms_at_5pct=round(at5.masked_dense_ms, 4),
        source=at5.source,
    )


MEASURED_KS = (0.02, 0.05, 0.07, 0.1, 0.15)


def measure(out, B=512, width=4096, ratios=MEASURED_KS, rounds=5, min_run_time=2.0):
    """Per-example layer backward (dx, dW row-sparse, db) by its own products and by dense
    products on the masked dy, on the CPU, interleaved; rows in the harness's CSV schema."""
    torch.manual_seed(0)
    x = torch.randn(B, width, requires_grad=True)
    w = torch.randn(width, width, requires_grad=True)
    b = torch.randn(width, requires_grad=True)
    dy = torch.randn(B, width)
    backwards, ks = {}, {}
    for ratio in ratios:
        k = round(ratio * width)
        for masked in (False, True):
            y = _mebp_linear(x, w, b, k, "per_example", "sparse", False, None, None, masked)
            name = f"{'masked-dense' if masked else 'per-example'} k={k}"
            backwards[name] = lambda y=y: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)
            ks[name] = k
    timings = harness.measure_side_by_side(
        backwards, "cpu", min_run_time=min_run_time, rounds=rounds
    )
    rows = [
        dict(
            kernel="layer",
            provider="mebp-torch-masked-dense" if name.startswith("masked") else "mebp-torch",
            mode="per_example",
            grad="sparse",
            dtype="fp32",
            batch=B,
            in_features=width,
            out_features=width,
            k=ks[name],
            metric="backward",
            **harness.timing_fields(timing),
        )
        for name, timing in timings.items()
    ]
    harness.write_rows(rows, out, harness.environment(torch.device("cpu")))
    for name, timing in timings.items():
        print(f"{name:<22}{timing.median_ms:>9.1f} ms  ({timing.q20_ms:.1f}-{timing.q80_ms:.1f})")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    results = Path(__file__).parent / "results"
    parser.add_argument("--out", default=str(results / "per-example-break-even.csv"))
    parser.add_argument("--measure", action="store_true", help="also time both ways on the CPU")
    parser.add_argument("--measured-out", default=str(results / "per-example-masked-dense-cpu.csv"))
    parser.add_argument("--threads", type=int, default=2, help="CPU threads for --measure")
    args = parser.parse_args(argv)
    os.environ.pop(estimate.DATA_ENV, None)  # the shipped model, not a local sweep
    rows = [case_row(*case) for case in CASES]
    with open(args.out, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(rows)
    for r in rows:
        print(
            f"{r['device']:4} {r['dtype']:8} B={r['batch']} M={r['in_features']} "
            f"N={r['out_features']} grad={r['grad']}: break-even k = {r['break_even_k']} "
            f"({r['break_even_pct']}%), auto dense from k = {r['auto_dense_from_k']} "
            f"({r['model']})"
        )
    if args.measure:
        torch.set_num_threads(args.threads)
        measure(args.measured_out)
        print(f"wrote {args.measured_out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
