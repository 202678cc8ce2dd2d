"""Test helper: ahead-of-time compilation of kernels for sm_90 and sm_80 in a subprocess."""

import json
import os
import subprocess
import sys
from pathlib import Path

SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}


def compile_specs(specs):
    """Compiles every config of every spec for both targets; returns the worker's result list."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    # The checkout this test runs from, not whichever copy of the package is installed.
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
    worker = Path(__file__).with_name("aot_worker.py")
    done = subprocess.run(
        [sys.executable, str(worker)],
        input=json.dumps(specs),
        env=env,
        capture_output=True,
        text=True,
        timeout=1200,
    )
    if done.returncode != 0:
        raise RuntimeError(f"AOT worker failed:\n{done.stderr[-4000:]}")
    return json.loads(done.stdout)


def check_results(results):
    """Asserts every compile succeeded and fits the target's shared memory."""
    failures = [r for r in results if not r["ok"]]
    assert not failures, "\n".join(
        f"{r['kernel']} {r['label']} {r['config']} sm_{r['target']}: {r['error']}" for r in failures
    )
    too_big = [r for r in results if r["shared"] > SHARED_MEMORY_LIMIT[r["target"]]]
    assert not too_big, [(r["kernel"], r["config"], r["target"], r["shared"]) for r in too_big]
    assert all(r["cubin"] for r in results)


def config_indices(kernel, named_args):
    """Indices of the configs the kernel's pruner keeps for these arguments."""
    kept = kernel.pruned_configs(named_args)
    return [i for i, c in enumerate(kernel.configs) if any(c is k for k in kept)]
