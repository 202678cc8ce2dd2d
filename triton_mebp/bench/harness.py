"""The benchmark harness: one timer, one long-format CSV schema and its writer.

Used by the sweep, its LSTM section and every script in ``perf/``.

- ``measure(fn, device)``: median and 20/80% quantiles of one call in milliseconds, after a
  warm-up call: on CUDA ``triton.testing.do_bench`` (its own warm-up and repeats, event-timed,
  ``quantiles=[0.5, 0.2, 0.8]``); on the CPU ``torch.utils.benchmark`` (quantiles over the
  measured blocks). ``measure_side_by_side`` times several closures in interleaved rounds, so a
  change of machine load affects them alike.
- ``COLUMNS``: one row per measurement. ``kernel`` (what was timed), ``provider``, ``mode``,
  ``grad``, ``dtype`` (fp32 / bf16 / fp16), the layer's ``batch``, ``in_features``,
  ``out_features`` and ``k`` (kept count), ``shape`` (any other dimensions as ``key=value``
  pairs), ``metric``, ``median_ms``, ``q20_ms``, ``q80_ms``, ``tflops``, ``gbps``, ``config``
  (the autotune config), and on every row where and with what it ran: ``device``, ``torch``,
  ``triton``, ``triton_mebp`` (versions), ``commit``, ``timestamp`` (UTC).
- ``CsvSink`` appends rows (resumable: it knows which tasks a file already holds);
  ``write_rows`` writes a whole file. Both stamp rows with ``environment(device)`` and the time.
"""

import csv
import datetime
import os
import platform
import re
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch

COLUMNS = [
    "kernel",
    "provider",
    "mode",
    "grad",
    "dtype",
    "batch",
    "in_features",
    "out_features",
    "shape",
    "k",
    "metric",
    "median_ms",
    "q20_ms",
    "q80_ms",
    "tflops",
    "gbps",
    "config",
    "device",
    "torch",
    "triton",
    "triton_mebp",
    "commit",
    "timestamp",
]
ENVIRONMENT = ("device", "torch", "triton", "triton_mebp", "commit", "timestamp")
QUANTILES = (0.5, 0.2, 0.8)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}

# Layouts written before this harness, read (and upgraded on append) as COLUMNS.
_OLD_SWEEP = [c for c in COLUMNS if c not in ("shape", "triton_mebp")]
_OLD_LSTM = [
    "kernel",
    "provider",
    "metric",
    "dtype",
    "seq",
    "batch",
    "input",
    "hidden",
    "layers",
    "k",
    "median_ms",
    "q20_ms",
    "q80_ms",
    "device",
    "torch",
    "timestamp",
    "commit",
]


class Timing(NamedTuple):
    median_ms: float
    q20_ms: float
    q80_ms: float


# ---------------------------------------------------------------- timing


def measure(
    fn: Callable[[], object],
    device,
    *,
    min_run_time: float = 0.2,
    warmup_ms: int = 25,
    rep_ms: int = 100,
) -> Timing:
    """Median, 20% and 80% quantile of one call of ``fn`` in milliseconds, after a warm-up call
    (compiles, autotunes, allocates). ``min_run_time``: CPU seconds; ``warmup_ms``/``rep_ms``:
    ``do_bench``'s warm-up and repeat time on CUDA."""
    device = torch.device(device)
    fn()
    if device.type == "cuda":
        import triton.testing

        torch.cuda.synchronize(device)
        median, q20, q80 = triton.testing.do_bench(
            fn, warmup=warmup_ms, rep=rep_ms, quantiles=list(QUANTILES)
        )
        return Timing(float(median), float(q20), float(q80))
    return summarize(_cpu_blocks(fn, min_run_time))


def measure_side_by_side(
    fns: dict,
    device,
    *,
    min_run_time: float = 0.5,
    rounds: int = 5,
    warmup_ms: int = 25,
    rep_ms: int = 100,
) -> dict:
    """``{name: Timing}`` of several closures timed together. On the CPU each gets
    ``min_run_time`` seconds in total, spread over ``rounds`` interleaved rounds (robust to a
    shared machine's changing load); on CUDA each goes through ``do_bench`` once."""
    device = torch.device(device)
    if device.type == "cuda":
        return {
            name: measure(fn, device, warmup_ms=warmup_ms, rep_ms=rep_ms)
            for name, fn in fns.items()
        }
    for fn in fns.values():
        fn()
    blocks: dict = {name: [] for name in fns}
    for _ in range(rounds):
        for name, fn in fns.items():
            blocks[name] += _cpu_blocks(fn, min_run_time / rounds)
    return {name: summarize(times) for name, times in blocks.items()}


def _cpu_blocks(fn, min_run_time: float) -> list:
    """Milliseconds per call of each block ``torch.utils.benchmark`` measured."""
    from torch.utils import benchmark

    timer = benchmark.Timer(stmt="fn()", globals={"fn": fn}, num_threads=torch.get_num_threads())
    return [t * 1e3 for t in timer.blocked_autorange(min_run_time=min_run_time).times]


def summarize(times) -> Timing:
    """Median, 20% and 80% quantile of samples in milliseconds (for timers of one's own, such as
    the slowest rank's step of a distributed run)."""
    times = np.asarray(times, dtype=np.float64)
    median, q20, q80 = (float(np.quantile(times, q)) for q in QUANTILES)
    return Timing(median, q20, q80)


# ---------------------------------------------------------------- where and with what


def git_commit(root: Path | None = None) -> str:
    """The checked-out commit, read from ``.git`` without running git ("unknown" if none);
    ``$TRITON_MEBP_COMMIT`` overrides it."""
    if os.environ.get("TRITON_MEBP_COMMIT"):
        return os.environ["TRITON_MEBP_COMMIT"]
    root = Path(root) if root else Path(__file__).resolve().parents[1]
    for folder in (root, *root.parents):
        git = folder / ".git"
        if git.is_file():  # a worktree: "gitdir: PATH"
            git = Path(git.read_text().split(":", 1)[1].strip())
        if not git.is_dir():
            continue
        head = (git / "HEAD").read_text().strip()
        if not head.startswith("ref:"):
            return head[:12]
        ref = head.split(":", 1)[1].strip()
        for base in (git, _common_dir(git)):
            if (base / ref).is_file():
                return (base / ref).read_text().strip()[:12]
            packed = base / "packed-refs"
            if packed.is_file():
                for line in packed.read_text().splitlines():
                    if line.endswith(" " + ref):
                        return line.split()[0][:12]
        return "unknown"
    return "unknown"


def _common_dir(git: Path) -> Path:
    """A worktree's branches live in the main repository's folder (named in ``commondir``)."""
    common = git / "commondir"
    return (git / common.read_text().strip()).resolve() if common.is_file() else git


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what the platform module says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_name(device) -> str:
    """The GPU's name, or "cpu MODEL (N threads)" with PyTorch's current thread count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu {cpu_model()} ({torch.get_num_threads()} threads)"


def device_slug(device) -> str:
    """Short file-name form: "cpu", or the GPU's name ("nvidia-h100-80gb-hbm3")."""
    device = torch.device(device)
    if device.type != "cuda":
        return "cpu"
    return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(device).lower()).strip("-")


def triton_version() -> str:
    try:
        import triton
    except ImportError:
        return ""
    return triton.__version__


def environment(device) -> dict:
    """The columns every row carries, except the time (stamped when the row is written)."""
    from .. import __version__

    return dict(
        device=device_name(device),
        torch=torch.__version__,
        triton=triton_version(),
        triton_mebp=__version__,
        commit=git_commit(),
    )


def dtype_label(dtype: torch.dtype) -> str:
    return {v: k for k, v in DTYPES.items()}.get(dtype, str(dtype).replace("torch.", ""))


def shape_text(**dims) -> str:
    """``shape`` column text: "seq=30,hidden=500"."""
    return ",".join(f"{k}={v}" for k, v in dims.items())


def timing_fields(timing: Timing) -> dict:
    median, q20, q80 = timing
    return dict(median_ms=f"{median:.6g}", q20_ms=f"{q20:.6g}", q80_ms=f"{q80:.6g}")


def now() -> str:
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ---------------------------------------------------------------- the CSV


def read_rows(path) -> list[dict]:
    """Rows of a harness CSV as dicts of ``COLUMNS`` (older sweep and LSTM layouts upgraded);
    [] for a missing file. Raises ValueError for a CSV of another kind."""
    path = Path(path)
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        rows = list(reader)
        fields = reader.fieldnames or []
    if not fields:
        return []
    upgrade = _upgrade(fields)
    if upgrade is None:
        raise ValueError(f"{path} has other columns than the benchmark harness writes: {fields}")
    return [upgrade(r) for r in rows]


def _upgrade(fields):
    if fields == COLUMNS:
        return lambda r: r
    if fields == _OLD_SWEEP:
        return lambda r: {c: r.get(c, "") for c in COLUMNS}
    if fields == _OLD_LSTM:

        def lstm(r):
            provider = r["provider"]
            mode = (
                provider[len("mebp-") :] if provider in ("mebp-unified", "mebp-per_example") else ""
            )
            out = {c: "" for c in COLUMNS}
            out.update(
                kernel=r["kernel"],
                provider=provider,
                mode=mode,
                dtype=dtype_label(getattr(torch, r["dtype"])),
                batch=r["batch"],
                in_features=r["input"],
                out_features=str(4 * int(r["hidden"])),
                shape=shape_text(seq=r["seq"], hidden=r["hidden"], layers=r["layers"]),
                k=r["k"],
                metric=r["metric"],
                median_ms=r["median_ms"],
                q20_ms=r["q20_ms"],
                q80_ms=r["q80_ms"],
                device=r["device"],
                torch=r["torch"],
                commit=r["commit"],
                timestamp=r["timestamp"],
            )
            return out

        return lstm
    return None


def _stamp(rows: Iterable[dict], env: dict | None, columns=COLUMNS) -> list[dict]:
    stamp = now()
    out = []
    for r in rows:
        unknown = set(r) - set(columns)
        if unknown:
            raise ValueError(f"columns {sorted(unknown)} are not in the schema {columns}")
        r = {c: r.get(c, "") for c in columns} | {
            k: v for k, v in (env or {}).items() if not r.get(k)
        }
        r = {c: "" if v is None else str(v) for c, v in r.items()}  # as read back from the file
        if not r["timestamp"]:
            r["timestamp"] = stamp
        out.append(r)
    return out


class CsvSink:
    """Appends rows to a CSV of ``COLUMNS`` (header for a new file, flushed after each write).

    ``key(row)`` names the task a row belongs to: ``done`` holds the keys the file already has,
    so that a rerun can skip them. A file in an older layout is rewritten as ``COLUMNS`` first.
    """

    def __init__(self, path, key: Callable[[dict], tuple] | None = None, env: dict | None = None):
        self.path = Path(path)
        self.key = key
        self.env = env
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.rows = read_rows(self.path)  # raises for a CSV of another kind
        if self.rows and _header(self.path) != COLUMNS:
            _write(self.path, self.rows, "w")
        self.done = {key(r) for r in self.rows} if key else set()

    def write(self, rows: list[dict]) -> list[dict]:
        """Appends the rows (missing environment columns from ``env``, the time stamped now)."""
        rows = _stamp(rows, self.env)
        _write(self.path, rows, "a")
        self.rows += rows
        if self.key:
            self.done.update(self.key(r) for r in rows)
        return rows


def write_rows(rows: list[dict], path, env: dict | None = None, columns=COLUMNS) -> list[dict]:
    """Writes the rows to ``path`` as a new CSV of ``COLUMNS`` (replacing it). Results that are
    no timings (an accuracy table) name their own ``columns``; ``ENVIRONMENT`` is added to them."""
    if columns is not COLUMNS:
        columns = [c for c in columns if c not in ENVIRONMENT] + list(ENVIRONMENT)
    rows = _stamp(rows, env, columns)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    _write(Path(path), rows, "w", columns)
    return rows


def _header(path: Path) -> list:
    with open(path, newline="") as f:
        return next(csv.reader(f), [])


def _write(path: Path, rows: list[dict], how: str, columns=COLUMNS) -> None:
    new = how == "w" or not path.is_file() or path.stat().st_size == 0
    with open(path, how, newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)
