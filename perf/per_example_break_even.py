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

    python perf/per_example_break_even.py [--out perf/results/per-example-break-even.csv]
"""

import argparse
import csv
import os
from pathlib import Path

import torch

from triton_mebp import estimate

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


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--out",
        default=str(Path(__file__).parent / "results" / "per-example-break-even.csv"),
    )
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
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
