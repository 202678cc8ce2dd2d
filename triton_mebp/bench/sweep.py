"""Performance sweeps: dense vs meProp backward, whole training steps and each kernel alone.

``python -m triton_mebp sweep --quick`` (or ``perf/sweep.py``) times, for every layer shape,
k, mode and dtype, three providers side by side:

- ``dense``: ``F.linear`` with ordinary autograd (cuBLAS on a GPU, MKL/oneDNN on the CPU);
- ``mebp-torch``: meProp on the PyTorch-ops path;
- ``mebp-triton``: meProp on the Triton kernels (CUDA only; the interpreter is no timing target).

Metrics: ``forward``, ``backward`` (``dx``, ``dW``, ``db`` from a stored graph), ``step-sgd``
(and ``step-adam`` once ``triton_mebp.optim.RowAdam`` exists): forward + backward + optimizer
step; ``step-sgd-compiled`` (at the preset's ``compiled_ks``): the same SGD step with the layer
under ``torch.compile(fullgraph=True)`` (Inductor; the optimizer step stays eager); and per kernel (``kernel`` column): ``select``, ``input_grad``, ``weight_grad``, ``update``
(the dense provider's two GEMMs and its SGD update under the same names), and
``reduced_gemm``: the library GEMM ``dy_c @ W[idx]`` on operands gathered beforehand, the bar
that the gathered products are measured against. Timings and the CSV come from the benchmark
harness (``triton_mebp.bench.harness``): on a GPU ``triton.testing.do_bench`` (median, 20% and
80% quantiles of event-timed runs), on the CPU ``torch.utils.benchmark`` (quantiles over measured
blocks); every row names the device, versions, commit and time. Each row also holds the autotune
config the kernel chose, achieved TFLOP/s and GB/s, and the device's measured ceilings are rows of
their own (``kernel`` = ``copy`` / ``matmul``). Rows are appended to a long-format CSV as each
measurement finishes; a rerun skips what is already there for this device and commit.
"""

import argparse
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import harness
from .harness import (  # noqa: F401
    COLUMNS,
    DTYPES,
    CsvSink,
    Timing,
    device_name,
    device_slug,
    git_commit,
    read_rows,
)

PROVIDERS = ("dense", "mebp-torch", "mebp-triton")
MODES = ("unified", "per_example")
KERNELS = ("select", "input_grad", "weight_grad", "update")
LR = 1e-6  # tiny, so repeated optimizer steps leave the weights sane


@dataclass(frozen=True)
class Preset:
    shapes: tuple
    ks: tuple
    modes: tuple = MODES
    dtypes: tuple = ("fp32",)
    grads: tuple = ("sparse",)
    per_example_ks: tuple | None = None  # per-example mode only at these ratios (None: all ks)
    min_run_time: float = 0.2  # CPU: seconds per measurement
    rep_ms: int = 100  # GPU: do_bench's repeat time
    warmup_ms: int = 25
    lstm: tuple | None = (30, 32, 100, 500, 0.05)  # (seq, batch, input, hidden, k); None: no LSTM
    compiled_ks: tuple = ()  # k ratios (and the dense provider) that also time a compiled step


PRESETS = {
    "cpu": {
        "quick": Preset(
            shapes=((64, 256, 256), (128, 2048, 2048), (512, 1024, 1024), (512, 4096, 4096)),
            ks=(0.01, 0.05, 0.2),
            per_example_ks=(0.01, 0.05),
            compiled_ks=(0.05,),
        ),
        "full": Preset(
            shapes=(
                (64, 1024, 1024),
                (512, 1024, 1024),
                (512, 4096, 4096),
                (2048, 4096, 4096),
                (512, 4096, 16384),
            ),
            ks=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
            grads=("sparse", "dense"),
            min_run_time=0.5,
            compiled_ks=(0.01, 0.05, 0.2),
        ),
    },
    "cuda": {
        "quick": Preset(
            shapes=((1024, 4096, 4096), (4096, 8192, 8192)),
            ks=(0.01, 0.05, 0.2),
            dtypes=("bf16",),
            compiled_ks=(0.05,),
        ),
        "full": Preset(
            shapes=(
                (512, 1024, 1024),
                (1024, 4096, 4096),
                (1024, 8192, 8192),
                (4096, 8192, 8192),
                (4096, 16384, 16384),
            ),
            ks=(0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
            dtypes=("fp32", "bf16", "fp16"),
            grads=("sparse", "dense"),
            rep_ms=200,
            compiled_ks=(0.01, 0.05, 0.2),
        ),
        # The one-shot GPU check: the README's target shapes first, within a few minutes.
        "check": Preset(
            shapes=((4096, 8192, 8192), (1024, 8192, 8192), (1024, 4096, 4096), (256, 1024, 1024)),
            ks=(0.05, 0.01, 0.2),
            per_example_ks=(0.05,),
            dtypes=("bf16",),
            rep_ms=50,
            warmup_ms=10,
        ),
    },
}
PRESETS["cpu"]["check"] = Preset(
    shapes=((64, 256, 256),), ks=(0.05,), min_run_time=0.05, lstm=(4, 8, 16, 32, 0.25)
)


# ---------------------------------------------------------------- timing and the CSV


def task_key(row: dict) -> tuple:
    """What identifies one measurement task (all its rows share it)."""
    return tuple(
        str(row[c])
        for c in (
            "device",
            "commit",
            "provider",
            "mode",
            "grad",
            "dtype",
            "batch",
            "in_features",
            "out_features",
            "k",
        )
    )


def measure(fn, device: torch.device, preset: Preset) -> Timing:
    """(median, q20, q80) of one call of ``fn`` in milliseconds: the harness's timer with the
    preset's run times."""
    return harness.measure(
        fn,
        device,
        min_run_time=preset.min_run_time,
        warmup_ms=preset.warmup_ms,
        rep_ms=preset.rep_ms,
    )


# ---------------------------------------------------------------- work counts


def work(
    kernel: str,
    metric: str,
    mode: str,
    B: int,
    M: int,
    N: int,
    k: int,
    elem: int,
    grad: str = "sparse",
) -> tuple[float, float]:
    """(flops, least bytes moved) of one measurement, for TFLOP/s and GB/s; 0 where meaningless.

    ``k`` is the kept count (``N`` for the dense provider). Bytes count each operand read once
    and each result written once; index arrays are left out.
    """
    dense = k == N and mode == ""
    if kernel == "layer":
        if metric == "forward":
            return 2.0 * B * M * N, elem * (B * M + N * M + B * N)
        if metric == "backward":
            if dense:
                return 4.0 * B * M * N, elem * (B * N + 2 * B * M + 2 * N * M)
            w_rows = N if grad == "dense" else k  # a dense gradient writes every row
            return 4.0 * B * k * M, elem * (B * N + 2 * B * M + k * M + w_rows * M)
        return 0.0, 0.0
    if kernel == "select":
        return float(B * N), elem * (B * N + B * k)
    rows_of_w = min(N, B * k) if mode == "per_example" else k
    if kernel in ("input_grad", "reduced_gemm"):
        return 2.0 * B * k * M, elem * (B * k + rows_of_w * M + B * M)
    if kernel == "weight_grad":
        return 2.0 * B * k * M, elem * (B * k + B * M + rows_of_w * M)
    if kernel == "update":
        return 2.0 * rows_of_w * M, elem * 3 * rows_of_w * M
    return 0.0, 0.0


# ---------------------------------------------------------------- what is timed


def _step_optimizers():
    """Optimizers for the full-step timing: name -> (dense factory, meProp factory).

    ``step-adam`` times dense Adam against RowAdam.
    """
    from ..optim import RowAdam

    return {
        "sgd": (lambda ps: torch.optim.SGD(ps, lr=LR), lambda ps: torch.optim.SGD(ps, lr=LR)),
        "adam": (lambda ps: torch.optim.Adam(ps, lr=LR), lambda ps: RowAdam(ps, lr=LR)),
    }


def _kernel_groups():
    """The TunedKernels behind each timed operation, for the config column (GPU only)."""
    from ..kernels import gathered, optim_rows, selection
    from ..kernels._tuning import kernel_version

    v1 = kernel_version() == "v1"
    return {
        ("unified", "select"): (
            [selection.column_scores, selection.unified_select_row, selection.gather_columns]
            if v1
            else [
                selection.scores_bias_partial,
                selection.scores_bias_finish,
                selection.unified_top,
                selection.gather_padded,
            ]
        ),
        ("unified", "input_grad"): [gathered.gathered_rows_matmul],
        ("unified", "weight_grad"): [gathered.transposed_matmul_rows],
        ("per_example", "select"): [
            selection.per_example_select_rows if v1 else selection.per_example_top
        ],
        ("per_example", "input_grad"): [gathered.per_example_dx],
        ("per_example", "weight_grad"): [gathered.segment_rows],
        ("unified", "update"): [optim_rows.row_sgd],
        ("per_example", "update"): [optim_rows.row_sgd],
    }


def _config_of(provider, mode, kernel):
    if provider != "mebp-triton":
        return ""
    from ..kernels._tuning import config_label

    kernels = _kernel_groups().get((mode, kernel), [])
    return ";".join(f"{t.fn.__name__.strip('_')}[{config_label(t.last_config)}]" for t in kernels)


@dataclass(frozen=True)
class Task:
    provider: str
    mode: str  # "" for dense
    grad: str  # "dense" for the dense provider
    dtype: str
    B: int
    M: int
    N: int
    k: int  # N for the dense provider
    compiled: bool = False  # also time the step under torch.compile

    def row_base(self, env):
        return dict(
            provider=self.provider,
            mode=self.mode,
            grad=self.grad,
            dtype=self.dtype,
            batch=self.B,
            in_features=self.M,
            out_features=self.N,
            k=self.k,
            **env,
        )


def _layer_closures(task: Task, device):
    """name -> callable for forward, backward and the full steps of one layer."""
    from ..functional import mebp_linear

    dtype = DTYPES[task.dtype]
    x = torch.randn(task.B, task.M, device=device, dtype=dtype, requires_grad=True)
    weight = torch.nn.Parameter(
        torch.randn(task.N, task.M, device=device, dtype=dtype) / math.sqrt(task.M)
    )
    bias = torch.nn.Parameter(torch.zeros(task.N, device=device, dtype=dtype))
    dy = torch.randn(task.B, task.N, device=device, dtype=dtype)

    if task.provider == "dense":

        def layer(inp):
            return F.linear(inp, weight, bias)
    else:

        def layer(inp):
            return mebp_linear(inp, weight, bias, k=task.k, mode=task.mode, grad=task.grad)

    closures = {}

    def forward():
        with torch.no_grad():  # the autograd record is timed by the step
            return layer(x)

    closures["forward"] = forward
    y = layer(x)

    def backward():
        return torch.autograd.grad(y, (x, weight, bias), dy, retain_graph=True)

    closures["backward"] = backward

    for name, (dense_opt, mebp_opt) in _step_optimizers().items():
        opt = (dense_opt if task.provider == "dense" else mebp_opt)([weight, bias])

        def step(opt=opt):
            opt.zero_grad(set_to_none=True)
            x.grad = None  # dx flows on to the layer below; not accumulated
            layer(x).backward(dy)
            opt.step()

        closures[f"step-{name}"] = step
    if task.compiled:
        closures["step-sgd-compiled"] = _compiled_step(layer, x, weight, bias, dy, task.provider)
    return closures


COMPILE_BACKEND = "inductor"


def _compiled_step(layer, x, weight, bias, dy, provider):
    """The SGD step with the layer compiled whole (forward and backward graphs); the first call,
    the timer's warm-up, compiles."""
    torch._dynamo.reset()  # a fresh cache for each task: a sweep never reaches the recompile limit
    compiled = torch.compile(layer, fullgraph=True, backend=COMPILE_BACKEND)
    opt = _step_optimizers()["sgd"][0 if provider == "dense" else 1]([weight, bias])

    def step():
        opt.zero_grad(set_to_none=True)
        x.grad = None
        compiled(x).backward(dy)
        opt.step()

    return step


def _kernel_closures(task: Task, device):
    """kernel -> callable, each operation of one backward alone: the backend's own operations,
    the ones the autograd Function and the row optimizers call (run_task sets the backend)."""
    from .. import backend

    dtype = DTYPES[task.dtype]
    x = torch.randn(task.B, task.M, device=device, dtype=dtype)
    weight = torch.randn(task.N, task.M, device=device, dtype=dtype) / math.sqrt(task.M)
    dy = torch.randn(task.B, task.N, device=device, dtype=dtype)
    if task.provider == "dense":
        dw = dy.t() @ x
        return {
            "input_grad": lambda: dy @ weight,
            "weight_grad": lambda: dy.t() @ x,
            "update": lambda: weight.add_(dw, alpha=-LR),
        }
    ops = backend.ops_for(dy)
    row_step = torch.zeros(task.N, dtype=torch.float32, device=device)

    def update(idx, rows):
        return lambda: ops.row_sgd_step(
            weight,
            idx,
            rows,
            row_step,
            None,
            lr=LR,
            momentum=0.0,
            dampening=0.0,
            weight_decay=0.0,
            nesterov=False,
        )

    if task.mode == "unified":
        idx, dy_c = ops.unified_select(dy, task.k)
        rows = ops.gathered_weight_grad(dy_c, x, idx)
        if task.grad == "dense":
            weight_grad = lambda: ops.gathered_weight_grad(
                dy_c, x, idx, out=torch.zeros_like(weight)
            )  # noqa: E731
        else:
            weight_grad = lambda: ops.gathered_weight_grad(dy_c, x, idx)  # noqa: E731
        closures = {
            "select": lambda: ops.unified_select(dy, task.k),
            "input_grad": lambda: ops.gathered_input_grad(dy_c, weight, idx),
            "weight_grad": weight_grad,
            "update": update(idx, rows),
        }
        # The library GEMM on operands gathered beforehand: the bar for the gathered products.
        w_rows = weight.index_select(0, idx)
        closures["reduced_gemm"] = lambda: dy_c @ w_rows
        return closures
    values, idx = ops.per_example_select(dy, task.k)
    row_ids, rows = ops.per_example_weight_grad(values, idx, x, task.N)
    if task.grad == "dense":
        weight_grad = lambda: ops.per_example_weight_grad(values, idx, x, task.N, dense=True)  # noqa: E731
    else:
        weight_grad = lambda: ops.per_example_weight_grad(values, idx, x, task.N)  # noqa: E731
    return {
        "select": lambda: ops.per_example_select(dy, task.k),
        "input_grad": lambda: ops.per_example_input_grad(values, idx, weight),
        "weight_grad": weight_grad,
        "update": update(row_ids, rows),
    }


def _row(task, env, kernel, metric, timing, config=""):
    median, q20, q80 = timing
    elem = DTYPES[task.dtype].itemsize
    flops, nbytes = work(kernel, metric, task.mode, task.B, task.M, task.N, task.k, elem, task.grad)
    seconds = median * 1e-3
    return dict(
        task.row_base(env),
        kernel=kernel,
        metric=metric,
        median_ms=f"{median:.6g}",
        q20_ms=f"{q20:.6g}",
        q80_ms=f"{q80:.6g}",
        tflops=f"{flops / seconds / 1e12:.6g}" if flops and seconds > 0 else "",
        gbps=f"{nbytes / seconds / 1e9:.6g}" if nbytes and seconds > 0 else "",
        config=config,
    )


def run_task(task: Task, device, preset: Preset, env: dict) -> tuple[list[dict], list[str]]:
    """Rows of one (provider, mode, grad, dtype, shape, k), layer metrics then kernels, and the
    measurements that failed (as text)."""
    from .. import backend

    before = backend.get_backend()
    ops_backend = {"dense": before, "mebp-torch": "torch", "mebp-triton": "triton"}[task.provider]
    rows, failures = [], []

    def attempt(what, action):
        # One failing measurement (an op missing for a dtype, say) must not end the sweep.
        try:
            action()
        except Exception as error:  # reported, and main() exits non-zero
            failures.append(
                f"{task.provider} {task.mode or 'dense'} {task.grad} {task.dtype} "
                f"{task.B}x{task.M}x{task.N} k={task.k} {what}: "
                f"{type(error).__name__}: {str(error)[:300]}"
            )
            if device.type == "cuda":
                torch.cuda.synchronize(device)

    def time_layer(metric, fn):
        rows.append(_row(task, env, "layer", metric, measure(fn, device, preset)))

    def time_kernel(kernel, fn):
        timing = measure(fn, device, preset)
        rows.append(
            _row(task, env, kernel, "time", timing, _config_of(task.provider, task.mode, kernel))
        )

    try:
        backend.set_backend(ops_backend)
        for setup, timer in ((_layer_closures, time_layer), (_kernel_closures, time_kernel)):
            closures = {}
            attempt(setup.__name__.strip("_"), lambda: closures.update(setup(task, device)))
            for name, fn in closures.items():
                attempt(name, lambda: timer(name, fn))
    finally:
        backend.set_backend(before)
    return rows, failures


def measure_ceilings(device, dtype: str, preset: Preset, env: dict) -> list[dict]:
    """Rows for the device's measured copy bandwidth and dense matmul rate in ``dtype``."""
    torch_dtype = DTYPES[dtype]
    n_bytes = (1 << 30) if device.type == "cuda" else (1 << 26)
    src = torch.randn(n_bytes // 4, device=device).to(torch_dtype)
    dst = torch.empty_like(src)
    size = 8192 if device.type == "cuda" else 2048
    a = torch.randn(size, size, device=device).to(torch_dtype)
    b = torch.randn(size, size, device=device).to(torch_dtype)
    base = dict(provider="torch", mode="", grad="", dtype=dtype, k=0, config="", **env)
    rows = []
    copy = measure(lambda: dst.copy_(src), device, preset)
    traffic = 2 * src.numel() * src.element_size()
    rows.append(
        dict(
            base,
            kernel="copy",
            metric="bandwidth",
            batch=1,
            in_features=src.numel(),
            out_features=src.numel(),
            median_ms=f"{copy[0]:.6g}",
            q20_ms=f"{copy[1]:.6g}",
            q80_ms=f"{copy[2]:.6g}",
            tflops="",
            gbps=f"{traffic / copy[0] / 1e6:.6g}",
        )
    )
    mm = measure(lambda: a @ b, device, preset)
    rows.append(
        dict(
            base,
            kernel="matmul",
            metric="rate",
            batch=size,
            in_features=size,
            out_features=size,
            median_ms=f"{mm[0]:.6g}",
            q20_ms=f"{mm[1]:.6g}",
            q80_ms=f"{mm[2]:.6g}",
            tflops=f"{2 * size**3 / mm[0] / 1e9:.6g}",
            gbps="",
        )
    )
    return rows


# ---------------------------------------------------------------- the sweep


def plan(preset: Preset, providers, device) -> list[Task]:
    """Tasks in order: for each dtype and shape, dense first, then meProp per k and mode."""
    from ..functional import resolve_k

    tasks = []
    for dtype in preset.dtypes:
        for B, M, N in preset.shapes:
            if "dense" in providers:
                compiled = any(ratio in preset.ks for ratio in preset.compiled_ks)
                tasks.append(Task("dense", "", "dense", dtype, B, M, N, N, compiled))
            for ratio in preset.ks:
                k = resolve_k(ratio, N)
                for mode in preset.modes:
                    if (
                        mode == "per_example"
                        and preset.per_example_ks is not None
                        and ratio not in preset.per_example_ks
                    ):
                        continue
                    for grad in preset.grads:
                        for provider in providers:
                            if provider != "dense":
                                tasks.append(
                                    Task(
                                        provider,
                                        mode,
                                        grad,
                                        dtype,
                                        B,
                                        M,
                                        N,
                                        k,
                                        ratio in preset.compiled_ks,
                                    )
                                )
    return tasks


def _parse_shapes(text):
    shapes = []
    for part in text.split(","):
        dims = part.lower().split("x")
        if len(dims) != 3 or not all(d.strip().isdigit() and int(d) > 0 for d in dims):
            raise argparse.ArgumentTypeError(
                f"shape {part!r} is not BATCHxINxOUT with positive sizes"
            )
        shapes.append(tuple(int(d) for d in dims))
    return tuple(shapes)


def _parse_ks(text):
    ks = []
    for part in text.split(","):
        try:
            value = float(part)
        except ValueError:
            raise argparse.ArgumentTypeError(f"k {part!r} is not a number") from None
        if not 0.0 < value <= 1.0:
            raise argparse.ArgumentTypeError(f"k {part!r} must be a ratio in (0, 1]")
        ks.append(value)
    return tuple(ks)


def _choices(allowed, what):
    def parse(text):
        items = tuple(t.strip() for t in text.split(",") if t.strip())
        bad = [t for t in items if t not in allowed]
        if bad or not items:
            raise argparse.ArgumentTypeError(f"{what} must be from {list(allowed)}, got {text!r}")
        return items

    return parse


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"expected a positive {kind.__name__}, got {text!r}"
            ) from None
        if not value > 0:  # also NaN
            raise argparse.ArgumentTypeError(f"expected a positive {kind.__name__}, got {text!r}")
        return value

    return parse


def build_parser():
    from ..app.cli import CommandParser

    parser = CommandParser(prog="mebp sweep", description=__doc__.split("\n")[0])
    group = parser.add_mutually_exclusive_group()
    group.add_argument(
        "--quick",
        dest="preset",
        action="store_const",
        const="quick",
        help="small sweep (the default; under 2 minutes on a 2-core CPU)",
    )
    group.add_argument(
        "--full", dest="preset", action="store_const", const="full", help="every shape, k, dtype"
    )
    group.add_argument("--preset", choices=("quick", "full", "check"), help="preset by name")
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--out",
        type=Path,
        default=None,
        help="CSV to append to (default perf/results/sweep-DEVICE.csv)",
    )
    parser.add_argument("--shapes", type=_parse_shapes, help="BxMxN,... (batch x in x out)")
    parser.add_argument("--ks", type=_parse_ks, help="k ratios, e.g. 0.01,0.05")
    parser.add_argument(
        "--compiled-ks",
        type=_parse_ks,
        help="k ratios (of --ks) that also time the step under torch.compile",
    )
    parser.add_argument("--no-compiled", action="store_true", help="no torch.compile step timings")
    parser.add_argument("--modes", type=_choices(MODES, "modes"), help="unified,per_example")
    parser.add_argument(
        "--dtypes", type=_choices(tuple(DTYPES), "dtypes"), help="fp32,bf16,fp16 (GPU)"
    )
    parser.add_argument(
        "--grads",
        type=_choices(("sparse", "dense"), "grads"),
        help="meProp weight-gradient layouts: sparse,dense",
    )
    parser.add_argument(
        "--providers",
        type=_choices(PROVIDERS, "providers"),
        help="dense,mebp-torch,mebp-triton (the last on a GPU)",
    )
    parser.add_argument("--min-run-time", type=_positive(float), help="CPU seconds per measurement")
    parser.add_argument(
        "--rep-ms", type=_positive(int), help="GPU milliseconds per measurement (do_bench rep)"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="CPU threads for PyTorch (recorded in the device name); default: as set",
    )
    parser.add_argument(
        "--time-budget",
        type=_positive(float),
        default=None,
        help="seconds; no new task starts after this (the rest stays for a rerun)",
    )
    parser.add_argument(
        "--fresh", action="store_true", help="measure again what the CSV already has"
    )
    parser.add_argument(
        "--no-ceilings", action="store_true", help="skip the copy / matmul ceilings"
    )
    parser.add_argument(
        "--no-lstm",
        action="store_true",
        help="skip the LSTM section (MeLSTM against nn.LSTM, lstm-DEVICE.csv)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--fit",
        action="store_true",
        help="measure nothing: fit the speed model of estimate_speedup to the sweep "
        "CSV (--out, default every perf/results/sweep-*.csv) and write it "
        "to --model-out",
    )
    parser.add_argument(
        "--commit",
        default=None,
        help="with --fit: the commit whose rows to fit (default: each device's latest)",
    )
    parser.add_argument(
        "--model-out",
        type=Path,
        default=None,
        help="with --fit: the JSON to write (default: the model shipped in the "
        "package, triton_mebp/data/speed_model.json)",
    )
    return parser


def _progress(total, disabled):
    from tqdm import tqdm

    return tqdm(total=total, unit="task", file=sys.stderr, disable=disabled)


def summary(rows: list[dict]) -> str:
    """Backward and step speedups of meProp over dense, one line per measured combination."""
    dense = {
        (r["dtype"], r["batch"], r["in_features"], r["out_features"], r["metric"]): float(
            r["median_ms"]
        )
        for r in rows
        if r["provider"] == "dense" and r["kernel"] == "layer"
    }
    lines = [
        f"{'provider':12} {'mode':11} {'grad':6} {'dtype':5} {'B x M x N':>18} {'k':>6} "
        f"{'bwd ms':>9} {'bwd x':>7} {'step x':>7}"
    ]
    for r in rows:
        if r["provider"] == "dense" or r["kernel"] != "layer" or r["metric"] != "backward":
            continue
        shape = (r["dtype"], r["batch"], r["in_features"], r["out_features"])
        bwd = float(r["median_ms"])
        step = [
            x
            for x in rows
            if x["kernel"] == "layer" and x["metric"] == "step-sgd" and task_key(x) == task_key(r)
        ]
        dense_bwd = dense.get(shape + ("backward",))
        dense_step = dense.get(shape + ("step-sgd",))
        speedup = f"{dense_bwd / bwd:7.2f}" if dense_bwd else f"{'-':>7}"
        step_speedup = (
            f"{dense_step / float(step[0]['median_ms']):7.2f}"
            if dense_step and step
            else f"{'-':>7}"
        )
        lines.append(
            f"{r['provider']:12} {r['mode']:11} {r['grad']:6} {r['dtype']:5} "
            f"{'x'.join(shape[1:]):>18} {r['k']:>6} {bwd:9.3f} {speedup} {step_speedup}"
        )
    return "\n".join(lines)


def main(argv=None) -> int:
    threads = torch.get_num_threads()
    try:
        return _main(build_parser().parse_args(argv))
    finally:
        torch.set_num_threads(threads)  # --threads holds for this sweep only


def fit(csvs, commit=None, out=None) -> int:
    """Writes the speed model fitted to the sweep CSVs (one commit per device) as JSON."""
    from .. import estimate

    csvs = [Path(p) for p in csvs]
    missing = [str(p) for p in csvs if not p.is_file()]
    if not csvs or missing:
        print(
            f"mebp sweep --fit: no sweep CSV to fit ({', '.join(missing) or 'none given'})",
            file=sys.stderr,
        )
        return 2
    rows = estimate.read_sweep(csvs)
    if commit is not None:
        rows = [r for r in rows if r["commit"] == commit]
    model = estimate.fit_speed_model(rows)
    if not model["devices"]:
        print(
            f"mebp sweep --fit: {', '.join(map(str, csvs))} hold no dense and meProp layer rows"
            + (f" of commit {commit}" if commit else ""),
            file=sys.stderr,
        )
        return 2
    model["fitted_from"] = [p.as_posix() for p in csvs]
    out = Path(out) if out else Path(estimate.__file__).parent.joinpath(*estimate.SHIPPED)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(model, indent=1) + "\n")
    for device in model["devices"]:
        print(
            f"mebp sweep --fit: {device['device']} at commit {device['commit']}: "
            f"{len(device['fits'])} fits",
            file=sys.stderr,
        )
    print(f"mebp sweep --fit: wrote {out}", file=sys.stderr)
    return 0


def _main(args) -> int:
    if args.fit:
        return fit(
            [args.out] if args.out else sorted(Path("perf/results").glob("sweep-*.csv")),
            args.commit,
            args.model_out,
        )
    try:
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except RuntimeError:
        print(f"mebp sweep: --device must be cpu or cuda, got {args.device!r}", file=sys.stderr)
        return 2
    if device.type == "cuda" and not torch.cuda.is_available():
        print("mebp sweep: --device cuda asked for, but PyTorch sees no CUDA GPU", file=sys.stderr)
        return 2
    if device.type not in ("cpu", "cuda"):
        print(f"mebp sweep: device must be cpu or cuda, got {device}", file=sys.stderr)
        return 2
    if args.threads is not None:
        if args.threads < 1:
            print(f"mebp sweep: --threads must be at least 1, got {args.threads}", file=sys.stderr)
            return 2
        torch.set_num_threads(args.threads)
    kind = "cuda" if device.type == "cuda" else "cpu"
    preset = PRESETS[kind][args.preset or "quick"]
    overrides = {
        name: getattr(args, name)
        for name in ("shapes", "ks", "modes", "dtypes", "grads", "compiled_ks")
        if getattr(args, name) is not None
    }
    if args.no_compiled:
        overrides["compiled_ks"] = ()
    if "ks" in overrides:
        overrides["per_example_ks"] = None  # the ks asked for hold for both modes
    if args.min_run_time is not None:
        overrides["min_run_time"] = args.min_run_time
    if args.rep_ms is not None:
        overrides["rep_ms"] = args.rep_ms
    preset = Preset(**{**preset.__dict__, **overrides})
    providers = args.providers or (PROVIDERS if kind == "cuda" else ("dense", "mebp-torch"))
    if kind == "cpu":
        if "mebp-triton" in providers:
            print(
                "mebp sweep: the Triton provider needs a CUDA GPU (the interpreter is no timing "
                "target); dropped",
                file=sys.stderr,
            )
            providers = tuple(p for p in providers if p != "mebp-triton")
        bad = [d for d in preset.dtypes if d != "fp32"]
        if bad:
            print(f"mebp sweep: CPU timings are fp32 only, got {bad}", file=sys.stderr)
            return 2
    out = args.out or Path("perf/results") / f"sweep-{device_slug(device)}.csv"
    env = harness.environment(device)
    sink = CsvSink(out, key=task_key)
    tasks = plan(preset, providers, device)
    todo = [t for t in tasks if args.fresh or task_key(t.row_base(env)) not in sink.done]
    ceilings = (
        []
        if args.no_ceilings
        else [
            d
            for d in preset.dtypes
            if args.fresh
            or task_key(
                dict(
                    provider="torch",
                    mode="",
                    grad="",
                    dtype=d,
                    batch=1,
                    k=0,
                    **_ceiling_dims(device),
                    **env,
                )
            )
            not in sink.done
        ]
    )
    print(
        f"mebp sweep: {device_name(device)}, {len(todo)} of {len(tasks)} tasks to run "
        f"({len(tasks) - len(todo)} already in {out}), providers {list(providers)}",
        file=sys.stderr,
    )
    start = time.monotonic()
    bar = _progress(len(todo) + len(ceilings), args.no_progress)
    written, skipped, failures = [], 0, []
    try:
        for dtype in ceilings:
            bar.set_postfix_str(f"ceilings {dtype}")
            try:
                sink.write(measure_ceilings(device, dtype, preset, env))
            except Exception as error:  # reported; the layer timings still run
                failures.append(f"ceilings {dtype}: {type(error).__name__}: {error}")
                print(f"mebp sweep: FAILED {failures[-1]}", file=sys.stderr)
            bar.update()
        for task in todo:
            if args.time_budget is not None and time.monotonic() - start > args.time_budget:
                skipped += 1
                continue
            bar.set_postfix_str(
                f"{task.provider} {task.mode or 'dense'} {task.dtype} "
                f"{task.B}x{task.M}x{task.N} k={task.k}"
            )
            rows, failed = run_task(task, device, preset, env)
            written += sink.write(rows)
            failures += failed
            for line in failed:
                print(f"mebp sweep: FAILED {line}", file=sys.stderr)
            bar.update()
    finally:
        bar.close()
    if preset.lstm is not None and not args.no_lstm:
        failures += run_lstm_section(
            preset, device, out.with_name(f"lstm-{device_slug(device)}.csv"), env, args.fresh
        )
    every = [r for r in sink.rows if r["device"] == env["device"] and r["commit"] == env["commit"]]
    print(summary(every))
    print(
        f"mebp sweep: wrote {len(written)} rows to {out} in {time.monotonic() - start:.0f} s"
        + (f"; {skipped} tasks left for a rerun (time budget)" if skipped else "")
        + (f"; {len(failures)} measurements FAILED (see above)" if failures else ""),
        file=sys.stderr,
    )
    return 1 if failures else 0


def run_lstm_section(preset: Preset, device, out: Path, env: dict, fresh: bool) -> list[str]:
    """MeLSTM against nn.LSTM at the preset's sizes, appended to its own CSV; skipped when that
    CSV already holds this device kind and commit. Returns the failures."""
    from . import lstm as bench_lstm

    seq, batch, n_in, hidden, k = preset.lstm
    dtype = DTYPES[preset.dtypes[0]]
    sink = CsvSink(out)
    done = [
        r
        for r in sink.rows
        if r["commit"] == env["commit"] and r["device"].startswith("cpu") == (device.type == "cpu")
    ]
    if done and not fresh:
        print(f"mebp sweep: LSTM section already in {out}", file=sys.stderr)
        return []
    try:
        rows = bench_lstm.run(
            seq, batch, n_in, hidden, 1, k, device, dtype=dtype, min_run_time=preset.min_run_time
        )
    except Exception as error:  # reported; the layer rows are already written
        print(f"mebp sweep: FAILED lstm: {type(error).__name__}: {error}", file=sys.stderr)
        return [f"lstm: {type(error).__name__}: {error}"]
    rows = sink.write([dict(r, commit=env["commit"]) for r in rows])
    print(bench_lstm.table(rows))
    return []


def _ceiling_dims(device):
    elements = ((1 << 30) if device.type == "cuda" else (1 << 26)) // 4
    return dict(in_features=elements, out_features=elements)


if __name__ == "__main__":
    sys.exit(main())
