"""Backward time of MeLSTM against nn.LSTM at the same sizes (CPU always, GPU when available).

    python perf/bench_lstm.py [--seq 30 --batch 32 --input 100 --hidden 500 --k 0.05 --layers 1]
                              [--threads N] [--min-run-time 0.5] [--csv perf/results/lstm.csv]

Providers, all timed in one run on the same inputs:
- ``nn.LSTM``: PyTorch's fused LSTM (cuDNN on a GPU, oneDNN on the CPU), and on the CPU also
  ``nn.LSTM-no-onednn`` (PyTorch's own ATen kernels): oneDNN spins its threads and slows down
  badly on a CPU shared with other work, so both are shown;
- ``mebp-dense``: MeLSTM with k = 4H (its own BPTT loop, no sparsification): the loop's overhead;
- ``mebp-unified`` / ``mebp-per_example``: MeLSTM at the given k.

Metrics: ``backward`` (gradients of input, states and weights from a stored graph),
``forward``, and ``products``: only the matrix products of BPTT (per step ``dh = dgates @ W_hh``,
then ``dx``, ``dW_ih``, ``dW_hh`` for all steps), dense against the top-k ones, on fixed gate
gradients. Medians with 20/80% quantiles from the benchmark harness: on the CPU the providers
run interleaved, round after round (robust to a shared machine's changing load); on the GPU,
triton.testing.do_bench. Rows in the harness's CSV schema (``kernel`` = "lstm", ``in_features``
the input size, ``out_features`` the 4H gates that k is counted in, ``shape`` the rest).
"""

import argparse
import sys
from pathlib import Path

import torch
from torch import nn

from triton_mebp import backend
from triton_mebp.bench import harness
from triton_mebp.functional import resolve_k
from triton_mebp.rnn import MeLSTM, deferred_products


def _layer_closures(lstm, x, onednn=True):
    """Closures running the forward, and the backward of a stored graph.

    ``onednn=False`` keeps PyTorch's CPU LSTM off oneDNN (its own ATen kernels instead).
    """
    wrt = [x, *lstm.parameters()]
    with torch.backends.mkldnn.flags(enabled=onednn):
        out, _ = lstm(x)
    grad_out = torch.randn_like(out)

    def forward():
        with torch.no_grad(), torch.backends.mkldnn.flags(enabled=onednn):
            lstm(x)

    def backward():
        torch.autograd.grad(out, wrt, grad_out, retain_graph=True)

    return forward, backward


def _product_closures(seq, batch, n_in, hidden, k, device, dtype):
    """The matrix products of BPTT alone, as MeLSTM's backward runs them: the recurrent product at
    every step (after that step's selection), then the library's deferred products."""
    g = torch.Generator(device="cpu").manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device, dtype)

    w_ih, w_hh = rand(4 * hidden, n_in), rand(4 * hidden, hidden)
    x, h_prev, dgates = (
        rand(seq, batch, n_in),
        rand(seq, batch, hidden),
        rand(seq, batch, 4 * hidden),
    )
    ops = backend.ops_for(x)

    def dense():
        for t in range(seq):
            dgates[t] @ w_hh
        deferred_products(ops, "dense", dgates, None, x, h_prev, w_ih, w_hh)

    def sparse(mode, select, recurrent):
        def run():
            kept, idx = [], []
            for t in range(seq):
                a, b = select(dgates[t], k)
                values, i = (b, a) if mode == "unified" else (a, b)
                recurrent(values, i)
                kept.append(values)
                idx.append(i)
            deferred_products(ops, mode, torch.stack(kept), torch.stack(idx), x, h_prev, w_ih, w_hh)

        return run

    return {
        "dense": dense,
        "unified": sparse(
            "unified", ops.unified_select, lambda dc, i: ops.gathered_input_grad(dc, w_hh, i)
        ),
        "per_example": sparse(
            "per_example",
            ops.per_example_select,
            lambda v, i: ops.per_example_input_grad(v, i, w_hh),
        ),
    }


def run(
    seq=30,
    batch=32,
    n_in=100,
    hidden=500,
    layers=1,
    k=0.05,
    device="cpu",
    dtype=torch.float32,
    min_run_time=0.5,
    modes=("unified", "per_example"),
):
    """Measures every provider and metric; returns rows of the harness's columns."""
    device = torch.device(device)
    k_count = resolve_k(k, 4 * hidden, "the LSTM gates")
    torch.manual_seed(0)
    dense = nn.LSTM(n_in, hidden, layers).to(device, dtype)
    x = torch.randn(seq, batch, n_in, device=device, dtype=dtype, requires_grad=True)
    providers = {"nn.LSTM": dense, "mebp-dense": MeLSTM.from_lstm(dense, k=1.0)}
    for mode in modes:
        providers[f"mebp-{mode}"] = MeLSTM.from_lstm(dense, k=k_count, mode=mode)
    base = dict(
        kernel="lstm",
        dtype=harness.dtype_label(dtype),
        batch=batch,
        in_features=n_in,
        out_features=4 * hidden,
        shape=harness.shape_text(seq=seq, hidden=hidden, layers=layers),
        **harness.environment(device),
        timestamp=harness.now(),
    )
    rows = []

    def add(provider, metric, kk, timing):
        mode = provider[len("mebp-") :] if provider in ("mebp-unified", "mebp-per_example") else ""
        rows.append(
            dict(
                base,
                provider=provider,
                mode=mode,
                metric=metric,
                k=kk,
                **harness.timing_fields(timing),
            )
        )

    closures = {provider: _layer_closures(lstm, x) for provider, lstm in providers.items()}
    if device.type == "cpu":
        closures = {
            "nn.LSTM": closures["nn.LSTM"],
            "nn.LSTM-no-onednn": _layer_closures(dense, x, onednn=False),
            **{p: c for p, c in closures.items() if p != "nn.LSTM"},
        }
    for metric, which in (("forward", 0), ("backward", 1)):
        timings = harness.measure_side_by_side(
            {p: c[which] for p, c in closures.items()}, device, min_run_time=min_run_time
        )
        for provider, timing in timings.items():
            sparse = provider.startswith("mebp-") and provider != "mebp-dense"
            add(provider, metric, k_count if sparse else 4 * hidden, timing)
    products = _product_closures(seq, batch, n_in, hidden, k_count, device, dtype)
    products = {"dense": products["dense"], **{f"mebp-{m}": products[m] for m in modes}}
    for provider, timing in harness.measure_side_by_side(
        products, device, min_run_time=min_run_time
    ).items():
        add(provider, "products", 4 * hidden if provider == "dense" else k_count, timing)
    return rows


def table(rows) -> str:
    """Median milliseconds per provider and metric, with the speedup over the dense reference."""
    ref = {
        (r["metric"]): float(r["median_ms"]) for r in rows if r["provider"] in ("nn.LSTM", "dense")
    }
    lines = [
        f"{'provider':18} {'metric':9} {'k':>5} {'median ms':>10} {'q20-q80 ms':>17} "
        f"{'vs dense':>8}"
    ]
    for r in rows:
        speedup = ref[r["metric"]] / float(r["median_ms"])
        lines.append(
            f"{r['provider']:18} {r['metric']:9} {r['k']:>5} {float(r['median_ms']):10.3f} "
            f"{float(r['q20_ms']):8.3f}-{float(r['q80_ms']):<8.3f} {speedup:7.2f}x"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seq", type=int, default=30)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--input", type=int, default=100)
    parser.add_argument("--hidden", type=int, default=500)
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--k", type=float, default=0.05, help="ratio of the 4H gate width")
    parser.add_argument("--min-run-time", type=float, default=0.5)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument(
        "--csv",
        type=Path,
        default=None,
        help="append the rows to this CSV (the benchmark harness's columns)",
    )
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    all_rows = []
    for device in devices:
        rows = run(
            args.seq,
            args.batch,
            args.input,
            args.hidden,
            args.layers,
            args.k,
            device,
            min_run_time=args.min_run_time,
        )
        print(
            f"{rows[0]['device']}: seq {args.seq}, batch {args.batch}, input {args.input}, "
            f"hidden {args.hidden}, layers {args.layers}, k {args.k}"
        )
        print(table(rows))
        all_rows += rows
    if args.csv:
        harness.CsvSink(args.csv).write(all_rows)
    return 0


if __name__ == "__main__":
    sys.exit(main())
