"""Backward of one linear layer: meProp (both modes, both gradient layouts) against dense.

Times the whole autograd backward (dx, dW, db) with ``torch.autograd.grad`` on a retained graph,
so no gradient accumulation is timed. CPU: torch.utils.benchmark medians with 20/80 quantiles;
CUDA: triton.testing.do_bench. All providers are measured in the same run, interleaved.

    python perf/bench_backward.py                      # B=512, M=N=4096, k=5%, fp32, CPU
    python perf/bench_backward.py --batch 4096 --features 8192 --dtype bf16 --device cuda
"""
import argparse
import json
import platform
import time

import torch
import torch.nn.functional as F

import triton_mebp as mebp

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def make_backward(provider, x, w, b, dy, k):
    if provider == "dense":
        y = F.linear(x, w, b)
    else:
        mode, grad = provider.split("/")
        y = mebp.mebp_linear(x, w, b, k=k, mode=mode, grad=grad)
    return lambda: torch.autograd.grad(y, (x, w, b), dy, retain_graph=True)


def measure(fn, device, min_run_time):
    if device.type == "cuda":
        import triton.testing
        q50, q20, q80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return q50 * 1e-3, q20 * 1e-3, q80 * 1e-3
    import torch.utils.benchmark as benchmark
    m = benchmark.Timer("fn()", globals={"fn": fn}, num_threads=torch.get_num_threads()
                        ).blocked_autorange(min_run_time=min_run_time)
    times = torch.tensor(m.times)
    return m.median, torch.quantile(times, 0.2).item(), torch.quantile(times, 0.8).item()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--features", type=int, default=4096, help="in = out features")
    parser.add_argument("--k", type=float, default=0.05)
    parser.add_argument("--dtype", choices=DTYPES, default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds per provider")
    parser.add_argument("--min-run-time", type=float, default=1.0)
    parser.add_argument("--threads", type=int, help="CPU threads (default: PyTorch's)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    n = args.features
    x = torch.randn(args.batch, n, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(n, n, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(n, device=device, dtype=dtype, requires_grad=True)
    dy = torch.randn(args.batch, n, device=device, dtype=dtype)
    k = mebp.resolve_k(args.k, n)
    providers = ["dense", "unified/sparse", "unified/dense", "per_example/sparse", "per_example/dense"]
    backwards = {p: make_backward(p, x, w, b, dy, k) for p in providers}
    for fn in backwards.values():
        fn()  # warm-up (and autotuning on a GPU)
    samples = {p: [] for p in providers}
    for _ in range(args.rounds):
        for p in providers:
            samples[p].append(measure(backwards[p], device, args.min_run_time))
    rows = []
    for p in providers:
        medians = sorted(s[0] for s in samples[p])
        mid = medians[len(medians) // 2]
        q20 = min(s[1] for s in samples[p])
        q80 = max(s[2] for s in samples[p])
        rows.append({"provider": p, "median_ms": mid * 1e3, "q20_ms": q20 * 1e3, "q80_ms": q80 * 1e3})
    dense = rows[0]["median_ms"]
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    print(f"backward of one layer: B={args.batch} M=N={n} k={k} ({args.k}) {args.dtype} on {device_name}, "
          f"{torch.get_num_threads()} threads, torch {torch.__version__}")
    print(f"{'provider':<22}{'median ms':>11}{'q20':>9}{'q80':>9}{'speedup':>9}")
    for r in rows:
        r["speedup"] = dense / r["median_ms"]
        print(f"{r['provider']:<22}{r['median_ms']:>11.2f}{r['q20_ms']:>9.2f}{r['q80_ms']:>9.2f}{r['speedup']:>8.1f}x")
    if args.json:
        meta = dict(batch=args.batch, features=n, k=k, dtype=args.dtype, device=device_name,
                    threads=torch.get_num_threads(), torch=torch.__version__,
                    time=time.strftime("%Y-%m-%dT%H:%M:%S"))
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
