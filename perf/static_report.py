"""Static GPU report: what every kernel compiles to at the target shapes, without a GPU.

Each launcher runs on ``meta`` tensors at the target shape (B = 4096, M = N = 8192, k = 410 and
448; the ``unified-wide`` call: the unified selection at N = 65536, where its search splits over
programs) while its launches are recorded instead of run, so the report sees exactly the
arguments, strides and constexprs the library passes. Each recorded launch is specialised as
Triton's runtime does it (ints equal to 1 become constants, pointers and ints that are multiples
of 16 get ``tt.divisibility = 16``), compiled ahead of time for every autotune config its pruner
keeps at that shape (the configs the tuner can pick; ``--all-configs``: the whole space) and
every target, and read:

- ``ptxas -v`` (Triton's bundled ptxas, on the PTX for sm_90a / sm_80): registers, spill stores and
  loads, stack frame; shared memory (Triton's dynamic allocation, or ptxas's static count if more);
  from these, the programs resident per SM and the waves of the grid on an H100 / A100;
- the PTX: ``wgmma`` and ``mma.sync`` instructions; global loads and stores by width in bytes
  (``ld16`` = 16-byte vector loads, ``ld2`` = scalar 2-byte loads, ...); ``cp.async`` copies by size;
  TMA copies; global atomics and their memory order, shared-memory atomics.

Calls: ``unified`` (v2), ``unified-pointer`` (v2 without TMA), ``unified-v1``, ``unified-wide``,
``per_example`` (v2), ``per_example-v1``, ``row_update``, ``inference``, and ``unified-amp``: the
unified products under autocast with float32 master weights (bf16/fp16 ``dy_c`` and x, float32 W
read and dW written; TMA and pointer kernels).

Counts are static (instructions in the code), not dynamic. One CSV row per call x kernel x config
x dtype x k x target, written to ``perf/results/static-report-triton<version>.csv``.

    python perf/static_report.py                       # everything, both targets
    python perf/static_report.py --calls unified --dtypes bf16 --ks 410 --targets 90 \\
        --first-config --json -                        # a few rows as JSON on stdout (tests)
"""

import argparse
import contextlib
import copy
import csv
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))  # a source checkout, without installing

B, M, N = 4096, 8192, 8192
KS = (410, 448)
N_WIDE = 65536  # a vocabulary-sized layer: the unified search splits over programs
DTYPES = ("bf16", "fp16", "fp32")
TARGETS = (90, 80)
SMS = 132  # H100 SXM; programs per SM are reported against it
# Per SM of the target's GPU (H100 SXM, A100): SMs, shared memory, registers, warps, programs.
GPU_LIMITS = {
    90: dict(sms=132, smem=228 * 1024, registers=65536, warps=64, programs=32),
    80: dict(sms=108, smem=164 * 1024, registers=65536, warps=64, programs=32),
}
SMEM_RESERVED = 1024  # shared memory the driver reserves per program (sm_80 and later)
# Kernels the launchers take on sm_90+ only (TMA descriptors): not compiled for older targets.
HOPPER_ONLY = ("gathered_rows_matmul_tma", "transposed_matmul_rows_tma")
TORCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
TRITON_TYPES = {
    "bfloat16": "bf16",
    "float16": "fp16",
    "float32": "fp32",
    "float64": "fp64",
    "int32": "i32",
    "int64": "i64",
    "int16": "i16",
    "int8": "i8",
    "uint8": "u8",
    "bool": "i1",
}
COLUMNS = [
    "triton",
    "call",
    "kernel",
    "dtype",
    "k",
    "target",
    "config",
    "num_warps",
    "num_stages",
    "programs",
    "programs_per_sm",
    "resident_per_sm",
    "waves",
    "ok",
    "registers",
    "spill_stores",
    "spill_loads",
    "stack",
    "smem",
    "wgmma",
    "mma_sync",
    "ld16",
    "ld8",
    "ld4",
    "ld2",
    "ld1",
    "st16",
    "st8",
    "st4",
    "st2",
    "st1",
    "cp_async16",
    "cp_async_small",
    "tma",
    "atomics",
    "atomic_order",
    "shared_atomics",
    "error",
]


# ----------------------------------------------------------------------------------------------
# Recording the launches a launcher makes


@contextlib.contextmanager
def recording():
    """Within: every ``TunedKernel`` launch is appended to the yielded list instead of running."""
    from triton_mebp.kernels._tuning import TunedKernel

    launches = []
    original = TunedKernel.__getitem__

    def record(self, grid):
        def launch(*args, **kwargs):
            launches.append((self, grid, args, kwargs))

        return launch

    TunedKernel.__getitem__ = record
    try:
        yield launches
    finally:
        TunedKernel.__getitem__ = original


def _tuned_kernel_names():
    """``id(TunedKernel) -> "module:attr"`` over the kernel modules."""
    from triton_mebp.kernels._tuning import TunedKernel

    names = {}
    package = Path(importlib.import_module("triton_mebp.kernels").__file__).parent
    for path in sorted(package.glob("*.py")):
        if path.stem.startswith("__"):
            continue
        module_name = f"triton_mebp.kernels.{path.stem}"
        module = importlib.import_module(module_name)
        for attr, value in vars(module).items():
            if isinstance(value, TunedKernel):
                names.setdefault(id(value), f"{module_name}:{attr}")
    return names


def _calls(dtype_name, k):
    """``{call name: function}``; each function runs launchers on meta tensors at the target shape."""
    import torch
    import triton

    from triton_mebp.kernels import fused_mlp, gathered, optim_rows, selection

    dtype = getattr(torch, TORCH_DTYPES[dtype_name])
    meta = dict(device="meta")

    def t(*shape, dt=dtype):
        return torch.empty(shape, dtype=dt, **meta)

    def unified(version, tma="1"):
        def run():
            with _kernel_version(version, tma):
                dy, x, w = t(B, N), t(B, M), t(N, M)
                idx, dy_c = selection.unified_select(dy, k, t(N, dt=torch.int64))[:2]
                gathered.gathered_input_grad(dy_c, w, idx)
                gathered.gathered_weight_grad(dy_c, x, idx, out=t(N, M))
                gathered.gathered_weight_grad(dy_c, x, idx)

        return run

    def unified_wide():
        with _kernel_version("v2"):
            selection.unified_select_and_bias(t(B, N_WIDE), k, t(N_WIDE, dt=torch.int64))

    def unified_amp():
        """Autocast with float32 master weights: dy_c and x in ``dtype``, W and dW float32. The
        products alone (the TMA kernels and the pointer ones), on a dy_c laid out as the v2
        selection returns it."""
        from triton_mebp.kernels._tiles import mark_zero_padded, padded_columns

        f32 = torch.float32
        padded = t(B, padded_columns(k))
        mark_zero_padded(padded)
        dy_c, idx, x, w = padded[:, :k], t(k, dt=torch.int64), t(B, M), t(N, M, dt=f32)
        for tma in ("1", "0"):
            with _kernel_version("v2", tma):
                gathered.gathered_input_grad(dy_c, w, idx)
                gathered.gathered_weight_grad(dy_c, x, idx, out=t(N, M, dt=f32))
                gathered.gathered_weight_grad(dy_c, x, idx, dtype=f32)

    def per_example_v1():
        with _kernel_version("v1"):
            selection.per_example_select(t(B, N), k, t(N, dt=torch.int64))

    def per_example():
        dy, x, w = t(B, N), t(B, M), t(N, M)
        with _kernel_version("v2"):
            values, idx = selection.per_example_select(dy, k, t(N, dt=torch.int64))
        gathered.per_example_input_grad(values, idx, w)
        # per_example_weight_grad orders the entries by row with PyTorch ops first (nothing to
        # compile): its segment kernel is launched as with a dense gradient, one program per row.
        pairs, seg = t(B * k, dt=torch.int64), t(N + 1, dt=torch.int64)
        gathered.segment_rows[lambda meta: (N, triton.cdiv(M, meta["BLOCK_M"]))](
            seg, pairs, t(B * k), x, t(N, M), M, x.stride(0), x.stride(1), M, 1
        )

    def row_updates():
        p, g, idx = t(N, M), t(k, M), t(k, dt=torch.int64)
        step = t(N, dt=torch.float32)
        optim_rows.row_sgd_step(
            p,
            idx,
            g,
            step,
            t(N, M),
            lr=0.1,
            momentum=0.9,
            dampening=0.0,
            weight_decay=0.0,
            nesterov=False,
        )
        optim_rows.row_adagrad_step(
            p, idx, g, step, t(N, M), lr=0.1, lr_decay=0.0, weight_decay=0.0, eps=1e-10
        )
        optim_rows.row_adam_step(
            p,
            idx,
            g,
            step,
            t(N, M),
            t(N, M),
            lr=1e-3,
            beta1=0.9,
            beta2=0.999,
            eps=1e-8,
            weight_decay=0.01,
            decoupled=True,
        )

    def inference():
        x = t(65536, 784)
        fused_mlp.linear_act(x, t(512, 784), t(512), "relu")
        for width in (128, 256):  # 784-W-W-W-10: a pair of packed layers and a last one
            if not fused_mlp.fused_mlp_fits([width, width, width, 10], dtype):
                continue  # optimize_for_inference keeps such a model on the PyTorch path
            rest_w, rest_b = t(3, width, width), t(3, width)
            fused_mlp.fused_mlp(x, t(width, 784), t(width), rest_w, rest_b, 10)

    calls = {
        "unified": unified("v2"),
        "unified-pointer": unified("v2", tma="0"),
        "unified-v1": unified("v1"),
        "unified-wide": unified_wide,
        "per_example": per_example,
        "per_example-v1": per_example_v1,
        "row_update": row_updates,
    }
    if k == KS[0]:
        calls["inference"] = inference
    if dtype_name != "fp32":
        calls["unified-amp"] = unified_amp
    if dtype_name != "fp16":
        return calls
    return {name: fn for name, fn in calls.items() if name != "row_update"}


@contextlib.contextmanager
def _kernel_version(version, tma="1"):
    """The kernels of ``version`` (TRITON_MEBP_KERNELS), the gathered products on them too
    (TRITON_MEBP_PRODUCTS=triton: the report compiles Triton kernels, not cuBLAS calls), with
    TMA descriptors where the launchers take them for Hopper (TRITON_MEBP_TMA=1) or not ("0")."""
    names = ("TRITON_MEBP_KERNELS", "TRITON_MEBP_PRODUCTS", "TRITON_MEBP_TMA")
    before = {name: os.environ.get(name) for name in names}
    os.environ.update(
        TRITON_MEBP_KERNELS=version, TRITON_MEBP_PRODUCTS="triton", TRITON_MEBP_TMA=tma
    )
    try:
        yield
    finally:
        for name, value in before.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


# ----------------------------------------------------------------------------------------------
# Specialisation as the runtime applies it


def _aligned(tensor) -> bool:
    return tensor.storage_offset() * tensor.element_size() % 16 == 0


def specialise(fn, args, kwargs):
    """``(signature, constexprs, attrs)`` of a launch, as Triton's runtime specialises it."""
    import torch
    from triton.tools.tensor_descriptor import TensorDescriptor

    bound = dict(zip(fn.arg_names, args))
    bound.update(kwargs)
    signature, constexprs, attrs = {}, {}, {}
    for i, param in enumerate(fn.params):
        name = param.name
        if param.is_constexpr:
            if name in bound:
                constexprs[name] = bound[name]
            continue
        value = bound[name]
        divisible = False
        if isinstance(value, TensorDescriptor):  # a TMA descriptor: no divisibility attribute
            dtype = TRITON_TYPES[str(value.base.dtype).replace("torch.", "")]
            signature[name] = f"tensordesc<{dtype}[{', '.join(map(str, value.block_shape))}]>"
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TRITON_TYPES[str(value.dtype).replace("torch.", "")]
            divisible = _aligned(value)
        elif isinstance(value, bool):
            signature[name] = "u1" if hasattr(torch, "uint1") else "i1"
        elif isinstance(value, int):
            if value == 1:
                signature[name] = "constexpr"
                constexprs[name] = 1
                continue
            signature[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
            divisible = value % 16 == 0
        elif isinstance(value, float):
            signature[name] = "fp32"
        else:
            raise TypeError(f"{fn.__name__}: cannot specialise {name}={value!r}")
        if divisible:
            attrs[(i,)] = [["tt.divisibility", 16]]
    return signature, constexprs, attrs


def _configured(tuned, config, args, kwargs):
    """A launch's arguments as ``config``'s pre_hook leaves them (TMA descriptors take the
    config's block shape), on copies of the descriptors."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    if config.pre_hook is None:
        return args, kwargs
    args = [copy.copy(a) if isinstance(a, TensorDescriptor) else a for a in args]
    kwargs = {n: copy.copy(a) if isinstance(a, TensorDescriptor) else a for n, a in kwargs.items()}
    config.pre_hook({**dict(zip(tuned.fn.arg_names, args)), **kwargs, **config.all_kwargs()})
    return args, kwargs


def _programs(grid, config_kwargs):
    size = grid(dict(config_kwargs)) if callable(grid) else grid
    total = 1
    for dim in size:
        total *= int(dim)
    return total


def jobs_for(
    calls=None,
    dtypes=DTYPES,
    ks=KS,
    targets=TARGETS,
    first_config=False,
    kernels=None,
    all_configs=False,
):
    """Compile jobs (plain dicts) for the chosen calls, dtypes, k and targets: each launch's
    configs that its pruner keeps (all of them with ``all_configs``)."""
    names = _tuned_kernel_names()
    jobs, seen = [], set()
    for dtype_name in dtypes:
        for k in ks:
            for call, run in _calls(dtype_name, k).items():
                if calls and call not in calls:
                    continue
                with recording() as launches:
                    run()
                for tuned, grid, args, kwargs in launches:
                    kernel = names[id(tuned)]
                    short = kernel.split(":")[1]
                    if kernels and short not in kernels:
                        continue
                    named = dict(zip(tuned.fn.arg_names, args), **kwargs)
                    kept = tuned.pruned_configs(named)  # the configs the tuner can pick
                    if first_config:  # the config a launch without tuning takes
                        kept = kept[:1]
                    indices = [
                        i
                        for i, c in enumerate(tuned.configs)
                        if all_configs or any(c is k for k in kept)
                    ]
                    for index in indices:
                        config = tuned.configs[index]
                        signature, constexprs, attrs = specialise(
                            tuned.fn, *_configured(tuned, config, args, kwargs)
                        )
                        for target in targets:
                            if target < 90 and short in HOPPER_ONLY:
                                continue  # launched on Hopper only; older GPUs get the pointers
                            key = (
                                call,
                                kernel,
                                dtype_name,
                                k,
                                repr(signature),
                                repr(constexprs),
                                repr(attrs),
                                index,
                                target,
                            )
                            if key in seen:
                                continue
                            seen.add(key)
                            jobs.append(
                                dict(
                                    call=call,
                                    kernel=kernel,
                                    dtype=dtype_name,
                                    k=k,
                                    target=target,
                                    config_index=index,
                                    signature=signature,
                                    constexprs=constexprs,
                                    attrs=[[list(p), v] for p, v in attrs.items()],
                                    programs=_programs(grid, {**kwargs, **config.kwargs}),
                                )
                            )
    return jobs


# ----------------------------------------------------------------------------------------------
# Compiling and reading


def _ptxas(target):
    from triton.backends.nvidia.compiler import get_ptxas

    return get_ptxas(target).path


def _gpu_name(target):
    return f"sm_{target}a" if target >= 90 else f"sm_{target}"


PTXAS_USAGE = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(
    r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads"
)
PTXAS_SMEM = re.compile(r"(\d+) bytes smem")
MEMORY_OP = re.compile(r"\b(ld|st)\.global((?:\.[\w:]+)*)")
CP_ASYNC = re.compile(
    r"\bcp\.async\.(?:ca|cg)\.shared\.global(?:\.[\w:]+)*\s+\[[^\]]+\],\s*\[[^\]]+\],\s*(0x[0-9a-fA-F]+|\d+)"
)
ATOMIC = re.compile(r"\b(atom|red)\b((?:\.[\w:]+)*)")
ORDERS = ("relaxed", "acquire", "release", "acq_rel", "sc")


def read_ptxas(log: str) -> dict:
    regs = PTXAS_USAGE.search(log)
    spills = PTXAS_SPILLS.search(log)
    smem = PTXAS_SMEM.search(log)
    return dict(
        registers=int(regs.group(1)) if regs else None,
        stack=int(spills.group(1)) if spills else None,
        spill_stores=int(spills.group(2)) if spills else None,
        spill_loads=int(spills.group(3)) if spills else None,
        smem=int(smem.group(1)) if smem else 0,
    )


def _access_bytes(suffixes):
    vector, bits = 1, None
    for part in suffixes.split(".")[1:]:
        if part in ("v2", "v4", "v8"):
            vector = int(part[1:])
        match = re.fullmatch(r"[bsuf](8|16|32|64|128)", part)
        if match:
            bits = int(match.group(1))
    return vector * bits // 8 if bits else None


def read_ptx(ptx: str) -> dict:
    """Static instruction counts of the PTX (comments and the header aside)."""
    code = "\n".join(line.split("//")[0] for line in ptx.splitlines())
    counts = {f"{op}{n}": 0 for op in ("ld", "st") for n in (16, 8, 4, 2, 1)}
    for op, suffixes in MEMORY_OP.findall(code):
        size = _access_bytes(suffixes)
        if size is not None:
            counts[f"{op}{min(size, 16)}"] += 1
    sizes = [int(s, 0) for s in CP_ASYNC.findall(code)]
    orders = set()
    atomics = shared_atomics = 0
    for _, suffixes in ATOMIC.findall(code):
        parts = suffixes.split(".")
        if "shared" in parts or "shared::cta" in parts:
            shared_atomics += 1  # e.g. tl.histogram's bins
            continue
        atomics += 1
        orders.add(next((o for o in ORDERS if o in parts), "default"))
    return dict(
        counts,
        wgmma=len(re.findall(r"\bwgmma\.mma_async", code)),
        mma_sync=len(re.findall(r"\bmma\.sync", code)),
        cp_async16=sum(s == 16 for s in sizes),
        cp_async_small=sum(s < 16 for s in sizes),
        tma=len(re.findall(r"\bcp\.async\.bulk\.tensor", code)),
        atomics=atomics,
        atomic_order="/".join(sorted(orders)),
        shared_atomics=shared_atomics,
    )


def occupancy(target, programs, registers, num_warps, smem) -> dict:
    """Programs resident per SM (limited by shared memory, registers, warps and the program
    count) and the waves of the grid on the target's GPU (``GPU_LIMITS``): waves below 1 leave
    SMs idle; a fraction above a whole number is a last, partly filled wave."""
    limits = GPU_LIMITS[target]
    if registers is None:  # ptxas printed no usage
        return dict(resident_per_sm="", waves="")
    warp_registers = -(-registers * 32 // 256) * 256  # allocated per warp in units of 256
    resident = min(
        limits["programs"],
        limits["warps"] // num_warps,
        limits["registers"] // (warp_registers * num_warps),
        limits["smem"] // (smem + SMEM_RESERVED),
    )
    waves = programs / (resident * limits["sms"]) if resident else float("inf")
    return dict(resident_per_sm=resident, waves=round(waves, 2))


def _config_label(config):
    parts = [f"{k}={v}" for k, v in config.kwargs.items()]
    return " ".join(parts)


def compile_job(job) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, attr = job["kernel"].split(":")
    tuned = getattr(importlib.import_module(module_name), attr)
    config = tuned.configs[job["config_index"]]
    constexprs = {**job["constexprs"], **config.kwargs}
    signature = dict(job["signature"])
    signature.update({name: "constexpr" for name in constexprs})
    attrs = {tuple(path): value for path, value in job["attrs"]}
    row = dict(
        triton=triton.__version__,
        call=job["call"],
        kernel=attr,
        dtype=job["dtype"],
        k=job["k"],
        target=f"sm_{job['target']}",
        config=_config_label(config),
        num_warps=config.num_warps,
        num_stages=config.num_stages,
        programs=job["programs"],
        programs_per_sm=round(job["programs"] / SMS, 2),
    )
    try:
        source = ASTSource(tuned.fn, signature, constexprs=constexprs, attrs=attrs)
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", job["target"], 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
        ptx = compiled.asm["ptx"]
        with tempfile.TemporaryDirectory() as folder:
            path = Path(folder, "kernel.ptx")
            path.write_text(ptx)
            done = subprocess.run(
                [
                    _ptxas(job["target"]),
                    "-v",
                    f"--gpu-name={_gpu_name(job['target'])}",
                    str(path),
                    "-o",
                    str(Path(folder, "kernel.cubin")),
                ],
                capture_output=True,
                text=True,
                timeout=600,
            )
        if done.returncode != 0:
            raise RuntimeError(f"ptxas: {done.stderr[-1000:]}")
        usage = read_ptxas(done.stderr + done.stdout)
        # ptxas counts static shared memory only; Triton allocates its buffers dynamically.
        usage["smem"] = max(usage["smem"], compiled.metadata.shared)
        row.update(ok=True, **usage, **read_ptx(ptx), error="")
        row.update(
            occupancy(
                job["target"], job["programs"], usage["registers"], config.num_warps, usage["smem"]
            )
        )
    except Exception as error:  # one failed compile is a row of the report, not the end of it
        row.update(ok=False, error=f"{type(error).__name__}: {error}"[:500].replace("\n", " "))
    return row


def _compile_key(job):
    return (
        job["kernel"],
        repr(job["signature"]),
        repr(job["constexprs"]),
        repr(job["attrs"]),
        job["config_index"],
        job["target"],
    )


def run_jobs(jobs, workers):
    """Yields the rows of every job as their compiles finish; identical specialisations (another
    call, another k) are compiled once."""
    os.environ.pop("TRITON_INTERPRET", None)
    groups = {}
    for job in jobs:
        groups.setdefault(_compile_key(job), []).append(job)
    todo = [same[0] for same in groups.values()]
    pool = ProcessPoolExecutor(workers) if workers > 1 else None
    try:
        done = pool.map(compile_job, todo, chunksize=1) if pool else map(compile_job, todo)
        for job, compiled in zip(todo, done):
            for same in groups[_compile_key(job)]:
                row = dict(compiled)
                row.update(
                    call=same["call"],
                    dtype=same["dtype"],
                    k=same["k"],
                    programs=same["programs"],
                    programs_per_sm=round(same["programs"] / SMS, 2),
                )
                if row["ok"]:
                    row.update(
                        occupancy(
                            same["target"],
                            same["programs"],
                            row["registers"],
                            row["num_warps"],
                            row["smem"],
                        )
                    )
                yield row
    finally:
        if pool:
            pool.shutdown()


SUMMARY_FIELDS = (
    "registers",
    "spill_stores",
    "smem",
    "ld16",
    "ld4",
    "ld2",
    "st16",
    "st2",
    "cp_async16",
    "tma",
    "wgmma",
    "programs_per_sm",
    "waves",
)


def summary(paths, dtype="bf16", k="410", target="sm_90") -> str:
    """Markdown table of the unified path, v1 against v2 (without and with TMA), each kernel's
    first config, from CSVs."""
    lines = [
        "| triton | path | kernel | config | " + " | ".join(SUMMARY_FIELDS) + " |",
        "|---" * (4 + len(SUMMARY_FIELDS)) + "|",
    ]
    for path in paths:
        with open(path, newline="") as handle:
            rows = [
                r
                for r in csv.DictReader(handle)
                if r["dtype"] == dtype and r["k"] == k and r["target"] == target
            ]
        with_tma = {r["kernel"] for r in rows if r["call"] == "unified"}
        for call, label in (
            ("unified-v1", "v1"),
            ("unified-pointer", "v2 TMA=0"),
            ("unified", "v2"),
        ):
            seen = set(with_tma) if call == "unified-pointer" else set()  # its products only
            for row in rows:
                if row["call"] != call or row["kernel"] in seen:
                    continue
                seen.add(row["kernel"])  # the first row of a kernel is its first config
                lines.append(
                    f"| {row['triton']} | {label} | {row['kernel']} | {row['config']} | "
                    + " | ".join(row.get(f, "") for f in SUMMARY_FIELDS)
                    + " |"
                )
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--calls",
        nargs="*",
        help="unified unified-pointer unified-v1 unified-wide unified-amp per_example "
        "per_example-v1 row_update inference",
    )
    parser.add_argument("--kernels", nargs="*", help="only these kernels (TunedKernel names)")
    parser.add_argument("--dtypes", nargs="*", default=list(DTYPES))
    parser.add_argument("--ks", nargs="*", type=int, default=list(KS))
    parser.add_argument("--targets", nargs="*", type=int, default=list(TARGETS))
    parser.add_argument(
        "--first-config",
        action="store_true",
        help="only the config each launch takes without tuning (the pruner's first)",
    )
    parser.add_argument(
        "--all-configs",
        action="store_true",
        help="every config of the space, also those the pruner drops at these shapes",
    )
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1))
    parser.add_argument(
        "--out", help="CSV path (default perf/results/static-report-triton<ver>.csv)"
    )
    parser.add_argument(
        "--merge",
        action="store_true",
        help="replace only the rows of the calls computed now in the CSV",
    )
    parser.add_argument("--json", help="write the rows as JSON to this path ('-': stdout) instead")
    parser.add_argument(
        "--summary",
        nargs="*",
        metavar="CSV",
        help="print the unified path's v1/v2 table (bf16, k=410, sm_90) of CSVs",
    )
    args = parser.parse_args(argv)
    if args.summary:
        print(summary(args.summary))
        return 0
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the interpreter cannot compile kernels")
    import triton

    jobs = jobs_for(
        args.calls,
        args.dtypes,
        args.ks,
        args.targets,
        args.first_config,
        args.kernels,
        args.all_configs and not args.first_config,
    )
    rows = run_jobs(jobs, args.jobs)
    if args.json:
        text = json.dumps(list(rows))
        if args.json == "-":
            print(text)
        else:
            Path(args.json).write_text(text)
        return 0
    out = Path(
        args.out or ROOT / "perf" / "results" / f"static-report-triton{triton.__version__}.csv"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    kept = []
    if args.merge and out.exists():
        # Keep the rows outside what is recomputed now (other calls, dtypes, k or targets).
        redone = {(j["call"], j["dtype"], str(j["k"]), f"sm_{j['target']}") for j in jobs}
        with out.open(newline="") as handle:
            kept = [
                r
                for r in csv.DictReader(handle)
                if (r["call"], r["dtype"], r["k"], r["target"]) not in redone
            ]
    written = failed = 0
    with out.open("w", newline="") as handle:  # row by row: a cut-short run keeps what it did
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(kept)
        for row in rows:
            writer.writerow(row)
            handle.flush()
            written += 1
            failed += not row["ok"]
    print(f"wrote {out}: {written} rows computed, {len(kept)} kept, {failed} failed compiles")
    return 0


if __name__ == "__main__":
    sys.exit(main())
