"""Smoke test of the installed wheel, run by .ci/wheel-check from outside the source tree.

Checks that the package imported is the installed one, that its dependencies are satisfied, and
that what the README's "Use" section shows works: MeLinear forward/backward (both backends, the
Triton kernels under the interpreter), convert + an optimizer step, a prune, the `mebp` command
and estimate_speedup.
"""

import importlib.metadata
import importlib.resources
import math
import os
import subprocess
import sys
from pathlib import Path

os.environ["TRITON_INTERPRET"] = "1"  # before any kernel module is imported; no GPU needed
os.environ["TRITON_MEBP_AUTOTUNE"] = "0"

import torch  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from torch import nn  # noqa: E402

import triton_mebp as mebp  # noqa: E402
import triton_mebp.kernels  # noqa: E402
from triton_mebp.estimate import estimate  # noqa: E402

# The checkout, and the copy of its files that the sdist and wheel were built from.
checkout, source_tree = (Path(arg).resolve() for arg in sys.argv[1:3])
installed = Path(mebp.__file__).resolve().parent


def check(condition: bool, message: str) -> None:
    if not condition:
        sys.exit(f"wheel smoke test: {message}")


# The installed package, not the checkout; the kernels installed under it; its metadata.
for module in (mebp, triton_mebp.kernels):
    path = Path(module.__file__).resolve()
    check(
        not {checkout, source_tree} & set(path.parents),
        f"{module.__name__} imported from the source tree: {path}",
    )
check(
    Path(triton_mebp.kernels.__file__).resolve().parent == installed / "kernels",
    f"triton_mebp.kernels is not installed under the package: {triton_mebp.kernels.__file__}",
)
check(
    importlib.metadata.version("triton_mebp") == mebp.__version__,
    "the installed version differs from triton_mebp.__version__",
)
check(importlib.resources.files("triton_mebp").joinpath("py.typed").is_file(), "py.typed missing")
for line in importlib.metadata.requires("triton_mebp") or []:
    requirement = Requirement(line)
    if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
        continue  # an optional extra
    found = importlib.metadata.version(requirement.name)
    check(
        requirement.specifier.contains(found, prereleases=True),
        f"dependency {requirement} not satisfied by the installed {found}",
    )

# Every file of the package in the source tree (modules, py.typed, data) is in the wheel.
for folder, package in (
    (source_tree / "triton_mebp", installed),
    (source_tree / "kernels", installed / "kernels"),
):
    for source in folder.rglob("*"):
        if source.is_file() and "__pycache__" not in source.parts:
            check(
                (package / source.relative_to(folder)).is_file(),
                f"{source.relative_to(source_tree)} is not in the wheel",
            )


def masked_reference(x, weight, dy, k):
    """Weight and input gradients of unified meProp in float64: the top-k columns of dy by
    summed magnitude, the rest zeroed."""
    x, weight, dy = x.double(), weight.double(), dy.double()
    keep = torch.topk(dy.abs().sum(0), k).indices
    masked = torch.zeros_like(dy)
    masked[:, keep] = dy[:, keep]
    return masked.T @ x, masked @ weight


torch.manual_seed(0)
for backend in ("torch", "triton"):
    mebp.set_backend(backend)
    layer = mebp.MeLinear(12, 20, k=5)
    x = torch.randn(6, 12, requires_grad=True)
    y = layer(x)
    check(
        torch.allclose(y, nn.functional.linear(x, layer.weight, layer.bias)),
        f"{backend}: MeLinear forward differs from F.linear",
    )
    dy = torch.randn_like(y)
    y.backward(dy)
    grad_w, grad_x = masked_reference(x.detach(), layer.weight.detach(), dy, 5)
    check(
        torch.allclose(layer.weight.grad.double(), grad_w, atol=1e-5, rtol=1e-5),
        f"{backend}: weight gradient differs from the masked dense reference",
    )
    check(
        torch.allclose(x.grad.double(), grad_x, atol=1e-5, rtol=1e-5),
        f"{backend}: input gradient differs from the masked dense reference",
    )
mebp.set_backend("auto")

# convert + an optimizer step: only the selected rows of a hidden layer move.
model = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
model = mebp.convert(model, k=4)
check(
    isinstance(model[0], mebp.MeLinear) and type(model[4]) is nn.Linear,
    "convert did not turn the hidden layers (only) into MeLinear",
)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
before = model[2].weight.detach().clone()
x, target = torch.randn(8, 16), torch.randint(0, 4, (8,))
nn.functional.cross_entropy(model(x), target).backward()
optimizer.step()
moved = (model[2].weight.detach() != before).any(1).sum().item()
check(1 <= moved <= 4, f"one SGD step moved {moved} rows of a k=4 layer")

# A prune: with threshold 1, only neurons selected in every example stay (at least min_width).
simplifier = mebp.Simplifier(model, threshold=1.0, optimizer=optimizer, min_width=2)
for _ in range(3):
    optimizer.zero_grad()
    nn.functional.cross_entropy(model(torch.randn(8, 16)), torch.randint(0, 4, (8,))).backward()
    optimizer.step()
report = simplifier.prune()
check(set(report) == {"0", "2"}, f"prune reported {dict(report)}")
check(all(new < old == 32 for old, new in report.values()), f"prune kept {dict(report)}")
check(
    model[2].in_features == model[0].out_features and model(x).shape == (8, 4),
    "the pruned model does not run",
)

# The command-line entry point.
mebp_command = Path(sys.executable).parent / "mebp"
result = subprocess.run([str(mebp_command), "--help"], capture_output=True, text=True, timeout=120)
check(
    result.returncode == 0 and "usage" in result.stdout.lower(),
    f"`mebp --help` failed ({result.returncode}): {result.stderr[-2000:]}",
)

# The speed model answers from the coefficients shipped in the package (no checkout, no sweep CSV).
speedup = mebp.estimate_speedup(256, 1024, 1024, 0.05, "unified", "cpu")
answer = estimate(256, 1024, 1024, 0.05, "unified", "cpu")
check(
    math.isfinite(speedup) and speedup > 0 and speedup == answer.speedup,
    f"estimate_speedup returned {speedup}",
)
check(
    answer.model == "shipped",
    f"the speed model for the CPU is {answer.model!r}, not the shipped one",
)
print(
    f"wheel smoke test: triton_mebp {mebp.__version__} from {installed}: passed "
    f"(estimate_speedup {speedup:.2f}x from the {answer.model} model: {answer.source})"
)
