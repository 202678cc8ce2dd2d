"""Row-sparse optimizer benchmark: the optimizer step alone and a full training step of one layer.

    python perf/bench_optim.py [--csv perf/results/optim.csv] [--quick] [--k 0.01 0.05 0.1]
                               [--threads N]

On the CPU (fp32, B=512, M=N=4096, k=5%, unified) and, when CUDA is available, on the GPU
(bf16, B=4096, M=N=8192, k=5%):

- step alone: ``RowAdam`` on a row-sparse gradient of k rows vs ``torch.optim.Adam`` on the
  dense gradient of the same layer;
- full step: forward + backward (input and weight gradients) + optimizer of
  ``MeLinear(grad="sparse")`` with ``RowAdam`` vs ``nn.Linear`` with ``torch.optim.Adam``; also
  ``F.linear`` forward alone, the floor that the full step cannot beat.

Medians (and 20/80 % quantiles) from the benchmark harness (``torch.utils.benchmark`` on the CPU,
``triton.testing.do_bench`` on the GPU), all cases measured side by side in one run. Appends
rows in the harness's CSV schema to the CSV if ``--csv`` is given.
"""

import argparse
import sys

import torch
import torch.nn.functional as F
from torch import nn

import triton_mebp as mebp
from triton_mebp.bench import harness
from triton_mebp.optim import RowAdam


def _cases(device, dtype, B, M, N, k_ratio):
    """name -> (fn, setup) closures; each fn runs one measured operation."""
    torch.manual_seed(0)
    k = mebp.resolve_k(k_ratio, N)
    x = torch.randn(B, M, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(B, N, device=device, dtype=dtype)

    # Optimizer step alone.
    w_dense = nn.Parameter(torch.randn(N, M, device=device, dtype=dtype) * 0.01)
    w_dense.grad = torch.randn(N, M, device=device, dtype=dtype)
    adam = torch.optim.Adam([w_dense], lr=1e-3)
    w_rows = nn.Parameter(w_dense.detach().clone())
    rows = torch.randperm(N, device=device)[:k].sort().values
    w_rows.grad = torch.sparse_coo_tensor(
        rows.unsqueeze(0),
        torch.randn(k, M, device=device, dtype=dtype),
        (N, M),
        is_coalesced=True,
        check_invariants=False,
    )
    row_adam = RowAdam([w_rows], lr=1e-3)

    # Full training step of one layer.
    dense_layer = nn.Linear(M, N, device=device, dtype=dtype)
    dense_opt = torch.optim.Adam(dense_layer.parameters(), lr=1e-3)
    me_layer = mebp.MeLinear(
        M, N, device=device, dtype=dtype, k=k_ratio, mode="unified", grad="sparse"
    )
    me_opt = RowAdam(me_layer.parameters(), lr=1e-3)

    def full_step(layer, opt):
        def run():
            x.grad = None
            opt.zero_grad(set_to_none=True)
            layer(x).backward(dy)
            opt.step()

        return run

    def forward_only():
        with torch.no_grad():
            F.linear(x, dense_layer.weight, dense_layer.bias)

    return k, {
        ("optimizer_step", "torch.optim.Adam"): adam.step,
        ("optimizer_step", "RowAdam"): row_adam.step,
        ("full_step", "nn.Linear+Adam"): full_step(dense_layer, dense_opt),
        ("full_step", "MeLinear(sparse)+RowAdam"): full_step(me_layer, me_opt),
        ("full_step", "forward_only"): forward_only,
    }


def run(device, dtype, B, M, N, k_ratio, min_run_time, sink):
    k, cases = _cases(device, dtype, B, M, N, k_ratio)
    env = harness.environment(device)
    print(
        f"\n{env['device']} {harness.dtype_label(dtype)}  B={B} M={M} N={N} k={k} ({k_ratio:.0%})"
    )
    timings = harness.measure_side_by_side(
        cases, device, min_run_time=min_run_time, warmup_ms=25, rep_ms=200
    )
    results = {}
    for (metric, provider), timing in timings.items():
        median, q20, q80 = timing
        results[(metric, provider)] = median
        print(f"  {metric:15s} {provider:26s} median {median:9.3f} ms  [{q20:.3f}, {q80:.3f}]")
    if sink is not None:
        sink.write(
            [
                dict(
                    env,
                    kernel="optim_rows",
                    provider=provider,
                    dtype=harness.dtype_label(dtype),
                    batch=B,
                    in_features=M,
                    out_features=N,
                    k=k,
                    metric=metric,
                    **harness.timing_fields(timing),
                )
                for (metric, provider), timing in timings.items()
            ]
        )
    step = results[("optimizer_step", "torch.optim.Adam")] / results[("optimizer_step", "RowAdam")]
    full = (
        results[("full_step", "nn.Linear+Adam")]
        / results[("full_step", "MeLinear(sparse)+RowAdam")]
    )
    bound = results[("full_step", "nn.Linear+Adam")] / results[("full_step", "forward_only")]
    print(
        f"  speedup: optimizer step {step:.1f}x, full step {full:.2f}x "
        f"(bound dense full step / forward = {bound:.2f}x)"
    )
    return step, full


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", help="append long-format results to this CSV file")
    parser.add_argument("--quick", action="store_true", help="shorter measurements")
    parser.add_argument(
        "--k", type=float, nargs="+", default=[0.05], help="kept ratios to sweep (default 0.05)"
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    min_run_time = 0.5 if args.quick else 2.0
    sink = harness.CsvSink(args.csv) if args.csv else None
    for k in args.k:
        run(torch.device("cpu"), torch.float32, 512, 4096, 4096, k, min_run_time, sink)
    if torch.cuda.is_available():
        for k in args.k:
            run(torch.device("cuda"), torch.bfloat16, 4096, 8192, 8192, k, min_run_time, sink)
    return 0


if __name__ == "__main__":
    sys.exit(main())
