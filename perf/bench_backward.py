"""Backward of one linear layer: meProp (both modes, both gradient layouts) against dense.

Times the whole autograd backward (dx, dW, db) of ``F.linear`` and of ``mebp_linear`` with
``torch.autograd.grad`` on a retained graph, so no gradient accumulation is timed. The benchmark
harness times all providers side by side (CPU: torch.utils.benchmark in interleaved rounds;
CUDA: triton.testing.do_bench), medians with 20/80% quantiles; rows in its CSV schema.

    python perf/bench_backward.py                      # B=512, M=N=4096, k=5%, fp32, CPU
    python perf/bench_backward.py --batch 4096 --features 8192 --dtype bf16 --device cuda
    python perf/bench_backward.py --threads 1 --out perf/results/backward-cpu.csv
"""

import argparse

import torch
import torch.nn.functional as F

import triton_mebp as mebp
from triton_mebp.bench import harness

PROVIDERS = ("dense", "unified/sparse", "unified/dense", "per_example/sparse", "per_example/dense")


def make_backward(provider, x, w, b, dy, k):
    if provider == "dense":
        y = F.linear(x, w, b)
    else:
        mode, grad = provider.split("/")
        y = mebp.mebp_linear(x, w, b, k=k, mode=mode, grad=grad)
    return lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)


def main(argv=None):
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--features", type=int, default=4096, help="in = out features")
    parser.add_argument("--k", type=float, default=0.05)
    parser.add_argument("--dtype", choices=harness.DTYPES, default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per provider")
    parser.add_argument("--min-run-time", type=float, default=3.0, help="CPU seconds per provider")
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--out", help="also write the rows to this CSV (replaced)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = torch.device(args.device), harness.DTYPES[args.dtype]
    n = args.features
    x = torch.randn(args.batch, n, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(n, n, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.batch, n, device=device, dtype=dtype)
    k = mebp.resolve_k(args.k, n)
    backwards = {p: make_backward(p, x, w, b, dy, k) for p in PROVIDERS}
    timings = harness.measure_side_by_side(
        backwards, device, min_run_time=args.min_run_time, rounds=args.rounds
    )
    env = harness.environment(device)
    meprop = "mebp-triton" if mebp.backend.ops_for(x).name == "triton" else "mebp-torch"
    rows = []
    for p, timing in timings.items():
        mode, grad = p.split("/") if p != "dense" else ("", "dense")
        rows.append(
            dict(
                kernel="layer",
                provider="dense" if p == "dense" else meprop,
                mode=mode,
                grad=grad,
                dtype=args.dtype,
                batch=args.batch,
                in_features=n,
                out_features=n,
                k=n if p == "dense" else k,
                metric="backward",
                **harness.timing_fields(timing),
            )
        )
    dense = timings["dense"].median_ms
    print(
        f"backward of one layer: B={args.batch} M=N={n} k={k} ({args.k}) {args.dtype} on "
        f"{env['device']}, torch {torch.__version__}"
    )
    print(f"{'provider':<22}{'median ms':>11}{'q20':>9}{'q80':>9}{'speedup':>9}")
    for p, (median, q20, q80) in timings.items():
        print(f"{p:<22}{median:>11.2f}{q20:>9.2f}{q80:>9.2f}{dense / median:>8.1f}x")
    if args.out:
        harness.write_rows(rows, args.out, env)
        print(f"wrote {args.out}")
    return rows


if __name__ == "__main__":
    main()
