"""Inference time of a compacted MLP against the uncompacted one and against PyTorch on the same
compacted weights.

Providers: ``uncompacted`` (the full-width model, PyTorch), ``compacted`` (the compacted widths,
PyTorch ops) and, on CUDA, ``fused`` (``optimize_for_inference``: the fused whole-MLP kernel).
Default shapes: 784-500-500-10 compacted to 784-64-64-10. Batch 65536 on the GPU (fp16, bf16,
fp32), 8192 on the CPU (fp32). The benchmark harness times them side by side: medians and 20/80
quantiles, rows in its CSV schema in perf/results/inference.csv.

    python perf/bench_inference.py [--full 784,500,500,10 --compact 784,64,64,10 --batch N]
"""

import argparse
from pathlib import Path

import torch
from torch import nn

from triton_mebp.bench import harness
from triton_mebp.inference import optimize_for_inference


def mlp(widths, device, dtype):
    layers = []
    for i, (n_in, n_out) in enumerate(zip(widths[:-1], widths[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(widths) - 2:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers).to(device, dtype).eval()


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--full", default="784,500,500,10")
    parser.add_argument("--compact", default="784,64,64,10")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--reps", type=int, default=9, help="interleaved rounds (CPU)")
    parser.add_argument("--min-run-time", type=float, default=1.0, help="CPU seconds per model")
    parser.add_argument("--device", choices=("all", "cpu", "cuda"), default="all")
    parser.add_argument("--out", default=str(Path(__file__).parent / "results" / "inference.csv"))
    args = parser.parse_args(argv)
    full = [int(w) for w in args.full.split(",")]
    compact = [int(w) for w in args.compact.split(",")]
    cases = [("cpu", torch.float32, args.batch or 8192)] if args.device in ("all", "cpu") else []
    if torch.cuda.is_available() and args.device in ("all", "cuda"):
        cases += [
            ("cuda", dtype, args.batch or 65536)
            for dtype in (torch.float16, torch.bfloat16, torch.float32)
        ]
    rows = []
    for device, dtype, batch in cases:
        torch.manual_seed(0)
        models = {"uncompacted": mlp(full, device, dtype), "compacted": mlp(compact, device, dtype)}
        if device == "cuda":
            models["fused"] = optimize_for_inference(models["compacted"])
        x = torch.randn(batch, full[0], device=device, dtype=dtype)
        with torch.inference_mode():
            if "fused" in models:  # the fused kernel computes what PyTorch computes
                torch.testing.assert_close(
                    models["fused"](x), models["compacted"](x), atol=5e-2, rtol=5e-2
                )
            calls = {name: (lambda model=model, x=x: model(x)) for name, model in models.items()}
            results = harness.measure_side_by_side(
                calls, device, min_run_time=args.min_run_time, rounds=args.reps
            )
        env = harness.environment(device)
        for name, timing in results.items():
            widths = full if name == "uncompacted" else compact
            rows.append(
                dict(
                    env,
                    kernel="mlp_inference",
                    provider=name,
                    dtype=harness.dtype_label(dtype),
                    batch=batch,
                    in_features=widths[0],
                    out_features=widths[-1],
                    shape=harness.shape_text(widths="-".join(map(str, widths))),
                    metric="forward",
                    **harness.timing_fields(timing),
                )
            )
        line = ", ".join(f"{name} {t.median_ms:.3f} ms" for name, t in results.items())
        ratio = results["uncompacted"].median_ms / results["compacted"].median_ms
        extra = (
            f", fused vs PyTorch on the same weights "
            f"{results['compacted'].median_ms / results['fused'].median_ms:.2f}x"
            if "fused" in results
            else ""
        )
        print(f"{device} {str(dtype):14s} B={batch}: {line}; compaction {ratio:.2f}x{extra}")
    if not rows:
        print("nothing measured: CUDA is not available")
        return
    harness.write_rows(rows, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
