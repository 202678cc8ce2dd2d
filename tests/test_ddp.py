"""MeLinear under DistributedDataParallel (gloo, 2 CPU processes): trains, ranks stay identical."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

import triton_mebp as mebp

WORLD = 2


def _train(rank, init_file, result_dir, grad):
    os.environ.pop("TRITON_INTERPRET", None)  # this path runs the PyTorch backend on CPU
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    torch.manual_seed(0)
    model = mebp.convert(nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU(),
                                       nn.Linear(16, 3)), k=4, grad=grad)
    start = [p.detach().clone() for p in model.parameters()]
    ddp = nn.parallel.DistributedDataParallel(model)
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    generator = torch.Generator().manual_seed(100 + rank)  # each rank sees its own data
    for _ in range(4):
        x = torch.randn(6, 8, generator=generator)
        y = torch.randint(0, 3, (6,), generator=generator)
        optimizer.zero_grad()
        nn.functional.cross_entropy(ddp(x), y).backward()
        optimizer.step()
    torch.save({"params": [p.detach() for p in model.parameters()], "start": start},
               os.path.join(result_dir, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_ddp_ranks_stay_identical(grad="dense"):
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(_train, args=(os.path.join(tmp, "init"), tmp, grad), nprocs=WORLD, join=True)
        results = [torch.load(os.path.join(tmp, f"rank{r}.pt")) for r in range(WORLD)]
    for a, b in zip(results[0]["params"], results[1]["params"]):
        assert torch.equal(a, b)
    moved = [not torch.equal(p, s) for p, s in zip(results[0]["params"], results[0]["start"])]
    assert all(moved)
