"""What the small benchmark scripts under perf/ share: the device label and the CSV writer."""
import csv
import platform
from datetime import datetime, timezone
from pathlib import Path

import torch


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
