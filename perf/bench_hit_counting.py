"""Cost of hit counting: backward time of one MeLinear with ``count_hits`` on vs off.

Default: B=512, M=N=4096, k=5%, both modes, on the CPU (PyTorch ops) and, when CUDA is present,
on the GPU (Triton kernels). The benchmark harness times on and off side by side (interleaved
rounds on the CPU, do_bench on the GPU): medians and 20/80 quantiles, rows in its CSV schema in
perf/results/hit_counting.csv.

    python perf/bench_hit_counting.py [--batch 512 --width 4096 --k 0.05 --reps 7]
"""

import argparse
from pathlib import Path

import torch

import triton_mebp as mebp
from triton_mebp.bench import harness


def backward_timer(layer, x, dy):
    y = layer(x)

    def run():
        torch.autograd.grad(y, [x, layer.weight], dy, retain_graph=True)

    return run


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--k", type=float, default=0.05)
    parser.add_argument("--reps", type=int, default=7, help="interleaved rounds (CPU)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="CPU seconds per case")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    parser.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "hit_counting.csv")
    )
    args = parser.parse_args(argv)
    devices = [
        d
        for d in ("cpu", "cuda")
        if args.device in (d, "all") and (d == "cpu" or torch.cuda.is_available())
    ]
    rows = []
    for device in devices:
        dtype = torch.float32 if device == "cpu" else torch.bfloat16
        env = harness.environment(device)
        for mode in ("unified", "per_example"):
            torch.manual_seed(0)
            layer = mebp.MeLinear(
                args.width, args.width, k=args.k, mode=mode, device=device, dtype=dtype
            )
            x = torch.randn(args.batch, args.width, device=device, dtype=dtype, requires_grad=True)
            dy = torch.randn(args.batch, args.width, device=device, dtype=dtype)
            runs = {}
            for counting in (False, True):
                layer.count_hits = counting
                runs[counting] = backward_timer(layer, x, dy)
            timings = harness.measure_side_by_side(
                runs, device, min_run_time=args.min_run_time, rounds=args.reps
            )
            for counting, timing in timings.items():
                rows.append(
                    dict(
                        env,
                        kernel="layer",
                        provider=f"count_hits={counting}",
                        mode=mode,
                        grad=layer.grad,
                        dtype=harness.dtype_label(dtype),
                        batch=args.batch,
                        in_features=args.width,
                        out_features=args.width,
                        k=layer.k_count,
                        metric="backward",
                        **harness.timing_fields(timing),
                    )
                )
            off, on = timings[False].median_ms, timings[True].median_ms
            print(
                f"{device} {mode:12s} backward: off {off:8.2f} ms, on {on:8.2f} ms "
                f"({(on / off - 1) * 100:+.1f}%)"
            )
    harness.write_rows(rows, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
