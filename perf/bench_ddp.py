"""Data-parallel training step: meProp's DistributedDataParallel against plain DDP.

    nice -n 10 python perf/bench_ddp.py [--world 2] [--threads 1] [--backend gloo|nccl]
        [--width 4096] [--batch 256] [--k 0.05] [--rounds 4] [--steps 2] [--csv PATH]

Starts ``--world`` processes (gloo on loopback, one thread each; ``--backend nccl`` puts rank r
on GPU r) that train an MLP width-width-width-10 on batches of ``--batch`` examples per rank,
with three providers side by side, interleaved in rounds:

- ``ddp-dense``: ``torch.nn.parallel.DistributedDataParallel`` over ``nn.Linear`` layers,
  ``torch.optim.Adam``;
- ``ddp-mebp-dense-allreduce``: the same DDP over the model converted to meProp (unified,
  k, ``grad="dense"``): local selection, every weight gradient all-reduced whole, ``Adam``;
- ``mebp-ddp``: ``triton_mebp.DistributedDataParallel`` (unified, k, ``grad="sparse"``, global
  selection, only the selected rows all-reduced), ``RowAdam``.

A step is zero_grad + forward + cross-entropy + backward + optimizer step, timed on every rank
after a barrier; the step time of a step is the slowest rank's. Bytes are the payload all-reduced
per step by each rank (``CommStats``: DDP's buckets and the meProp layers). Writes the timings
(median, 20 % and 80 % quantiles over the measured steps, the benchmark harness's schema) to
``--csv`` (default ``perf/results/ddp-{cpu|cuda}.csv``) and the bytes to the same name with
``-bytes`` (its own columns); ``shape`` records the world size, threads, widths and the machine's
1-minute load average before and after the run.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # this checkout's library

import triton_mebp as mebp  # noqa: E402
from triton_mebp.bench import harness  # noqa: E402
from triton_mebp.distributed import count_ddp_bytes  # noqa: E402

PROVIDERS = ("ddp-dense", "ddp-mebp-dense-allreduce", "mebp-ddp")


def _mlp(width, device):
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, 10)
    ).to(device)


def _provider(name, args, device):
    """(ddp, optimizer, stats) of one provider."""
    model = _mlp(args.width, device)
    if name == "ddp-dense":
        ddp = nn.parallel.DistributedDataParallel(model)
        return ddp, torch.optim.Adam(ddp.parameters(), lr=1e-3), count_ddp_bytes(ddp)
    if name == "ddp-mebp-dense-allreduce":
        ddp = nn.parallel.DistributedDataParallel(
            mebp.convert(model, k=args.k, mode="unified", grad="dense")
        )
        return ddp, torch.optim.Adam(ddp.parameters(), lr=1e-3), count_ddp_bytes(ddp)
    ddp = mebp.DistributedDataParallel(mebp.convert(model, k=args.k, mode="unified", grad="sparse"))
    return ddp, mebp.RowAdam(ddp.parameters(), lr=1e-3), ddp.comm_stats


def _step(ddp, optimizer, x, y, sync):
    """Times of (forward, backward, optimizer) in seconds."""
    sync()
    start = time.perf_counter()
    optimizer.zero_grad(set_to_none=True)
    loss = F.cross_entropy(ddp(x), y)
    sync()
    forward = time.perf_counter()
    loss.backward()
    sync()
    backward = time.perf_counter()
    optimizer.step()
    sync()
    end = time.perf_counter()
    return forward - start, backward - forward, end - backward


def _rank_main(rank, args, init_file, out_file):
    torch.set_num_threads(args.threads)
    device = torch.device(f"cuda:{rank}" if args.backend == "nccl" else "cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(
        args.backend, init_method=f"file://{init_file}", rank=rank, world_size=args.world
    )
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    generator = torch.Generator().manual_seed(rank)
    x = torch.randn(args.batch, args.width, generator=generator).to(device)
    y = torch.randint(0, 10, (args.batch,), generator=generator).to(device)
    providers = {name: _provider(name, args, device) for name in args.providers}
    times = {name: [] for name in providers}
    bytes_per_step = {}
    for round_ in range(args.rounds + 1):  # round 0 warms up
        for name, (ddp, optimizer, stats) in providers.items():
            for _ in range(args.steps):
                dist.barrier()
                stats.reset()
                phases = _step(ddp, optimizer, x, y, sync)
                if round_ > 0:
                    times[name].append(phases)
                bytes_per_step[name] = (stats.mebp_bytes, stats.ddp_bytes)
    # The step time of a step is its slowest rank's.
    table = torch.tensor([times[name] for name in providers], dtype=torch.float64)
    dist.all_reduce(table, op=dist.ReduceOp.MAX)
    if rank == 0:
        torch.save(
            dict(
                times={name: table[i].tolist() for i, name in enumerate(providers)},
                bytes=bytes_per_step,
            ),
            out_file,
        )
    dist.barrier()
    dist.destroy_process_group()


BYTE_COLUMNS = [
    "provider",
    "mode",
    "grad",
    "world",
    "batch",
    "widths",
    "k",
    "mebp_bytes",
    "ddp_bytes",
    "total_bytes",
]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--world", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--backend", choices=("gloo", "nccl"), default="gloo")
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--k", type=float, default=0.05)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2, help="steps per provider and round")
    parser.add_argument("--providers", nargs="+", choices=PROVIDERS, default=list(PROVIDERS))
    parser.add_argument("--csv", default=None, help="default: perf/results/ddp-{cpu|cuda}.csv")
    args = parser.parse_args(argv)
    device = "cuda" if args.backend == "nccl" else "cpu"
    out = Path(args.csv or HERE / "results" / f"ddp-{device}.csv")
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        result_file = os.path.join(tmp, "result.pt")
        mp.start_processes(
            _rank_main,
            args=(args, os.path.join(tmp, "init"), result_file),
            nprocs=args.world,
            start_method="spawn",
        )
        result = torch.load(result_file)
    k = mebp.resolve_k(args.k, args.width)
    torch.set_num_threads(args.threads)  # as in each rank, for the device label
    env = harness.environment(device)
    env["device"] += f", {args.backend}, {args.world} ranks"
    widths = f"{args.width}-{args.width}-{args.width}-10"
    shape = harness.shape_text(
        world=args.world,
        threads=args.threads,
        widths=widths,
        load=f"{load_before:.1f}-{os.getloadavg()[0]:.1f}",
    )
    grads = {"ddp-dense": "", "ddp-mebp-dense-allreduce": "dense", "mebp-ddp": "sparse"}
    common = dict(
        kernel="ddp_train_step",
        dtype="fp32",
        batch=args.batch,
        in_features=args.width,
        out_features=args.width,
        shape=shape,
        k=k,
    )
    rows, byte_rows, summary = [], [], {}
    for name, samples in result["times"].items():
        mode = "" if name == "ddp-dense" else "unified"
        phases = dict(
            step=[sum(s) for s in samples],
            forward=[s[0] for s in samples],
            backward=[s[1] for s in samples],
            optimizer=[s[2] for s in samples],
        )
        for metric, values in phases.items():
            timing = harness.summarize([v * 1e3 for v in values])
            rows.append(
                dict(
                    common,
                    provider=name,
                    mode=mode,
                    grad=grads[name],
                    metric=metric,
                    **harness.timing_fields(timing),
                )
            )
            summary[(name, metric)] = timing.median_ms
        mebp_bytes, ddp_bytes = result["bytes"][name]
        byte_rows.append(
            dict(
                provider=name,
                mode=mode,
                grad=grads[name],
                world=args.world,
                batch=args.batch,
                widths=widths,
                k=k,
                mebp_bytes=mebp_bytes,
                ddp_bytes=ddp_bytes,
                total_bytes=mebp_bytes + ddp_bytes,
            )
        )
        summary[(name, "bytes")] = mebp_bytes + ddp_bytes
    harness.write_rows(rows, out, env)
    bytes_out = out.with_name(out.stem + "-bytes" + out.suffix)
    harness.write_rows(byte_rows, bytes_out, env, columns=BYTE_COLUMNS)
    print(f"wrote {out} and {bytes_out}")
    base = summary.get(("ddp-dense", "step"))
    print(
        f"{shape}, B={args.batch}/rank, k={k}, {env['device']}, "
        f"{args.rounds * args.steps} steps each"
    )
    print(
        f"{'provider':28s} {'step ms':>9s} {'fwd':>7s} {'bwd':>7s} {'opt':>7s} {'MB/step':>9s}"
        f" {'speedup':>8s}"
    )
    for name in result["times"]:
        step = summary[(name, "step")]
        print(
            f"{name:28s} {step:9.1f} {summary[(name, 'forward')]:7.1f} "
            f"{summary[(name, 'backward')]:7.1f} {summary[(name, 'optimizer')]:7.1f} "
            f"{summary[(name, 'bytes')] / 1e6:9.2f} "
            f"{(base / step if base else float('nan')):7.2f}x"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
