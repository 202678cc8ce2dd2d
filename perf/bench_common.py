"""What the small benchmark scripts under perf/ share: CPU timing, the device label, the CSV."""
import csv
import platform
import statistics
import time
from datetime import datetime, timezone
from pathlib import Path

import torch


def time_cpu(fn, reps: int) -> list:
    """Wall-clock milliseconds of ``reps`` calls of ``fn`` after one warm-up call."""
    fn()
    samples = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - start) * 1e3)
    return samples


def quantiles(samples) -> tuple:
    """(median, 20% quantile, 80% quantile) of the samples."""
    ordered = sorted(samples)
    pick = lambda q: ordered[min(len(ordered) - 1, int(q * (len(ordered) - 1) + 0.5))]  # noqa: E731
    return statistics.median(ordered), pick(0.2), pick(0.8)


def run_fields(device: str) -> dict:
    """The columns every result row carries: device name, PyTorch version, time (UTC)."""
    name = torch.cuda.get_device_name() if device == "cuda" else platform.processor() or "cpu"
    return dict(device=name, torch=torch.__version__, time=datetime.now(timezone.utc).isoformat())


def write_rows(rows: list, out) -> None:
    """Writes long-format rows to ``out`` (replacing it), or says that nothing was measured."""
    if not rows:
        print("nothing measured: CUDA is not available")
        return
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")
