"""The library never imports the application or the benchmark wing."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]

BLOCKED_IMPORT = r"""
import importlib.abc, sys

class Blocker(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.startswith(("triton_mebp.app", "triton_mebp.bench")):
            raise ImportError(f"the library imported {name}")
        return None

sys.meta_path.insert(0, Blocker())
import torch
import triton_mebp as mebp

model = mebp.convert(torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(),
                                         torch.nn.Linear(16, 4)), k=3)
simplifier = mebp.Simplifier(model, threshold=0.0)
model(torch.randn(5, 8)).square().sum().backward()
simplifier.prune()
mebp.optimize_for_inference(model)(torch.randn(2, 8))
mebp.estimate_speedup(batch=64, in_features=256, out_features=256, k=12)
mebp.MeLSTM(4, 6, k=3)(torch.randn(3, 2, 4))
print("library-only import ok")
"""


def test_library_works_with_app_and_bench_unimportable():
    done = subprocess.run(
        [sys.executable, "-c", BLOCKED_IMPORT],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert "library-only import ok" in done.stdout


def test_no_library_module_names_the_wings():
    """Also catches imports inside functions, which the import test above may not reach."""
    package = ROOT / "triton_mebp"
    for path in package.glob("*.py"):
        if path.name == "__main__.py":  # `python -m triton_mebp` launches the application
            continue
        text = path.read_text()
        for wing in ("app", "bench"):
            assert f"triton_mebp.{wing}" not in text and f"from .{wing}" not in text, (
                f"{path.name} imports the {wing} wing"
            )
