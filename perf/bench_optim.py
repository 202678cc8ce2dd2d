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

Medians (and 20/80 % quantiles) from ``torch.utils.benchmark`` on the CPU and
``triton.testing.do_bench`` on the GPU, all cases measured side by side in one run. Appends
long-format rows to the CSV if ``--csv`` is given.
"""
import argparse
import csv
import datetime
import os
import platform
import sys

import torch
import torch.nn.functional as F
from torch import nn

import triton_mebp as mebp
from triton_mebp.optim import RowAdam


def _cpu_time(fn, min_run_time):
    from torch.utils import benchmark
    fn()  # warm-up
    measurement = benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(
        min_run_time=min_run_time)
    times = sorted(measurement.times)
    return (measurement.median, times[int(0.2 * (len(times) - 1))],
            times[int(0.8 * (len(times) - 1))])


def _gpu_time(fn, _min_run_time):
    import triton.testing
    low, median, high = triton.testing.do_bench(fn, quantiles=[0.2, 0.5, 0.8], warmup=25, rep=200)
    return median * 1e-3, low * 1e-3, high * 1e-3


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
    w_rows.grad = torch.sparse_coo_tensor(rows.unsqueeze(0), torch.randn(k, M, device=device,
                                                                          dtype=dtype),
                                          (N, M), is_coalesced=True, check_invariants=False)
    row_adam = RowAdam([w_rows], lr=1e-3)

    # Full training step of one layer.
    dense_layer = nn.Linear(M, N, device=device, dtype=dtype)
    dense_opt = torch.optim.Adam(dense_layer.parameters(), lr=1e-3)
    me_layer = mebp.MeLinear(M, N, device=device, dtype=dtype, k=k_ratio, mode="unified",
                             grad="sparse")
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


def run(device, dtype, B, M, N, k_ratio, min_run_time, writer):
    timer = _gpu_time if device.type == "cuda" else _cpu_time
    k, cases = _cases(device, dtype, B, M, N, k_ratio)
    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    print(f"\n{device.type} {device_name} {str(dtype).replace('torch.', '')}  B={B} M={M} N={N} "
          f"k={k} ({k_ratio:.0%}), threads={torch.get_num_threads()}")
    results = {}
    for (metric, provider), fn in cases.items():
        median, q20, q80 = timer(fn, min_run_time)
        results[(metric, provider)] = median
        print(f"  {metric:15s} {provider:26s} median {median * 1e3:9.3f} ms  "
              f"[{q20 * 1e3:.3f}, {q80 * 1e3:.3f}]")
        if writer is not None:
            writer.writerow(dict(
                kernel="optim_rows", provider=provider, shape=f"B={B},M={M},N={N}", k=k,
                dtype=str(dtype).replace("torch.", ""), metric=metric, median_ms=median * 1e3,
                q20_ms=q20 * 1e3, q80_ms=q80 * 1e3, device=device_name,
                versions=f"torch={torch.__version__}", time=datetime.datetime.now().isoformat()))
    step = results[("optimizer_step", "torch.optim.Adam")] / results[("optimizer_step", "RowAdam")]
    full = (results[("full_step", "nn.Linear+Adam")]
            / results[("full_step", "MeLinear(sparse)+RowAdam")])
    bound = results[("full_step", "nn.Linear+Adam")] / results[("full_step", "forward_only")]
    print(f"  speedup: optimizer step {step:.1f}x, full step {full:.2f}x "
          f"(bound dense full step / forward = {bound:.2f}x)")
    return step, full


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--csv", help="append long-format results to this CSV file")
    parser.add_argument("--quick", action="store_true", help="shorter measurements")
    parser.add_argument("--k", type=float, nargs="+", default=[0.05],
                        help="kept ratios to sweep (default 0.05)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    min_run_time = 0.5 if args.quick else 2.0
    writer = handle = None
    if args.csv:
        os.makedirs(os.path.dirname(args.csv) or ".", exist_ok=True)
        new = not os.path.exists(args.csv)
        handle = open(args.csv, "a", newline="")
        writer = csv.DictWriter(handle, fieldnames=[
            "kernel", "provider", "shape", "k", "dtype", "metric", "median_ms", "q20_ms", "q80_ms",
            "device", "versions", "time"])
        if new:
            writer.writeheader()
    try:
        for k in args.k:
            run(torch.device("cpu"), torch.float32, 512, 4096, 4096, k, min_run_time, writer)
        if torch.cuda.is_available():
            for k in args.k:
                run(torch.device("cuda"), torch.bfloat16, 4096, 8192, 8192, k, min_run_time, writer)
    finally:
        if handle is not None:
            handle.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
