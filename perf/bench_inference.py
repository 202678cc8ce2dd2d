"""Inference time of a compacted MLP against the uncompacted one and against PyTorch on the same
compacted weights.

Providers: ``uncompacted`` (the full-width model, PyTorch), ``compacted`` (the compacted widths,
PyTorch ops) and, on CUDA, ``fused`` (``optimize_for_inference``: the fused whole-MLP kernel).
Default shapes: 784-500-500-10 compacted to 784-64-64-10. Batch 65536 on the GPU (fp16, bf16,
fp32), 8192 on the CPU (fp32). Medians and 20/80 quantiles measured in one run; long-format CSV
to perf/results/inference.csv.

    python perf/bench_inference.py [--full 784,500,500,10 --compact 784,64,64,10 --batch N]
"""
import argparse
from pathlib import Path

import torch
from torch import nn

from bench_common import quantiles, run_fields, time_cpu, write_rows
from triton_mebp.inference import optimize_for_inference


def mlp(widths, device, dtype):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(device, dtype).eval()


def time_cpu_summary(fn, reps):
    return quantiles(time_cpu(fn, reps))


def time_cuda(fn, reps):
    import triton.testing
    return tuple(triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8], rep=max(100, reps * 20)))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", default="784,500,500,10")
    parser.add_argument("--compact", default="784,64,64,10")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "inference.csv"))
    args = parser.parse_args(argv)
    full = [int(w) for w in args.full.split(",")]
    compact = [int(w) for w in args.compact.split(",")]
    cases = [("cpu", torch.float32, args.batch or 8192)] if args.device in ("all", "cpu") else []
    if torch.cuda.is_available() and args.device in ("all", "cuda"):
        cases += [("cuda", dtype, args.batch or 65536)
                  for dtype in (torch.float16, torch.bfloat16, torch.float32)]
    rows = []
    for device, dtype, batch in cases:
        torch.manual_seed(0)
        models = {"uncompacted": mlp(full, device, dtype), "compacted": mlp(compact, device, dtype)}
        if device == "cuda":
            models["fused"] = optimize_for_inference(models["compacted"])
        x = torch.randn(batch, full[0], device=device, dtype=dtype)
        timer = time_cuda if device == "cuda" else time_cpu_summary
        results = {}
        with torch.inference_mode():
            if "fused" in models:  # the fused kernel computes what PyTorch computes
                torch.testing.assert_close(models["fused"](x), models["compacted"](x),
                                           atol=5e-2, rtol=5e-2)
            for name, model in models.items():
                results[name] = timer(lambda: model(x), args.reps)
        for name, (med, q20, q80) in results.items():
            widths = full if name == "uncompacted" else compact
            rows.append(dict(kernel="mlp_inference", provider=name,
                             shape=f"B={batch},widths={'-'.join(map(str, widths))}",
                             dtype=str(dtype).replace("torch.", ""), metric="ms", median=round(med, 4),
                             q20=round(q20, 4), q80=round(q80, 4),
                             **run_fields(device)))
        line = ", ".join(f"{name} {med:.3f} ms" for name, (med, _, _) in results.items())
        ratio = results["uncompacted"][0] / results["compacted"][0]
        extra = (f", fused vs PyTorch on the same weights {results['compacted'][0] / results['fused'][0]:.2f}x"
                 if "fused" in results else "")
        print(f"{device} {str(dtype):14s} B={batch}: {line}; compaction {ratio:.2f}x{extra}")
    write_rows(rows, args.out)

if __name__ == "__main__":
    main()
