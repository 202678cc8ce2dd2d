"""Cost of hit counting: backward time of one MeLinear with ``count_hits`` on vs off.

Default: B=512, M=N=4096, k=5%, both modes, on the CPU (PyTorch ops) and, when CUDA is present,
on the GPU (Triton kernels). Medians and 20/80 quantiles, on and off measured interleaved in one
run; long-format CSV to perf/results/hit_counting.csv.

    python perf/bench_hit_counting.py [--batch 512 --width 4096 --k 0.05 --reps 7]
"""
import argparse
from pathlib import Path

import torch

import triton_mebp as mebp
from bench_common import quantiles, run_fields, time_cpu, write_rows


def backward_timer(layer, x, dy):
    y = layer(x)

    def run():
        torch.autograd.grad(y, [x, layer.weight], dy, retain_graph=True)
    return run


def time_cuda(fn, reps):
    import triton.testing
    return list(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=max(50, reps * 10)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--k", type=float, default=0.05)
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "hit_counting.csv"))
    args = parser.parse_args(argv)
    devices = [d for d in ("cpu", "cuda") if args.device in (d, "all")
               and (d == "cpu" or torch.cuda.is_available())]
    rows = []
    for device in devices:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        for mode in ("unified", "per_example"):
            torch.manual_seed(0)
            layer = mebp.MeLinear(args.width, args.width, k=args.k, mode=mode, device=device, dtype=dtype)
            x = torch.randn(args.batch, args.width, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(args.batch, args.width, device=device, dtype=dtype)
            runs = {}
            for counting in (False, True):
                layer.count_hits = counting
                runs[counting] = backward_timer(layer, x, dy)
            samples = {False: [], True: []}
            for _ in range(args.reps if device == "cpu" else 1):  # interleaved, side by side
                for counting in (False, True):
                    if device == "cpu":
                        samples[counting] += time_cpu(runs[counting], 1)
                    else:
                        samples[counting] = time_cuda(runs[counting], args.reps)
            summary = {}
            for counting in (False, True):
                med, q20, q80 = (quantiles(samples[counting]) if device == "cpu"
                                 else tuple(samples[counting]))
                summary[counting] = med
                rows.append(dict(kernel="mebp_backward", provider=f"count_hits={counting}",
                                 shape=f"B={args.batch},M={args.width},N={args.width}", k=args.k,
                                 mode=mode, dtype=str(dtype).replace("torch.", ""), metric="ms",
                                 median=round(med, 4), q20=round(q20, 4), q80=round(q80, 4),
                                 **run_fields(device)))
            overhead = (summary[True] / summary[False] - 1) * 100
            print(f"{device} {mode:12s} backward: off {summary[False]:8.2f} ms, on {summary[True]:8.2f} ms "
                  f"({overhead:+.1f}%)")
    write_rows(rows, args.out)

if __name__ == "__main__":
    main()
