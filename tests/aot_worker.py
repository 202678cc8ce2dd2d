"""Compiles kernels ahead of time for GPU targets, without a GPU; run as a subprocess.

Reads a JSON list of specs on stdin, each ``{"kernel": "module:attr", "signature": {...},
"constexprs": {...}, "configs": [...], "targets": [...]}`` where ``attr`` is a ``TunedKernel``;
compiles the listed autotune configs (indices into ``kernel.configs``; all of them if absent) of
each for the listed targets (default ``TARGETS``) and prints one JSON list of results. Signature
types may name the config's constexprs, e.g. ``"tensordesc<bf16[{BLOCK_B}, {BLOCK_K}]>"`` for a
TMA descriptor whose block shape is the config's. It runs without
``TRITON_INTERPRET`` (the interpreter replaces ``triton.jit`` with something that cannot compile).
"""

import importlib
import json
import os
import re
import sys
from concurrent.futures import ProcessPoolExecutor

TARGETS = (90, 80)


def _compile(job):
    spec, config_index, capability = job
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module_name, attr = spec["kernel"].split(":")
    kernel = getattr(importlib.import_module(module_name), attr)
    config = kernel.configs[config_index]
    constexprs = {**spec.get("constexprs", {}), **config.kwargs}
    signature = {name: ty.format(**config.kwargs) for name, ty in spec["signature"].items()}
    signature.update({name: "constexpr" for name in constexprs})
    result = {
        "kernel": spec["kernel"],
        "label": spec.get("label", ""),
        "config": str(config.kwargs),
        "num_warps": config.num_warps,
        "num_stages": config.num_stages,
        "target": capability,
    }
    try:
        source = ASTSource(kernel.fn, signature, constexprs=constexprs)
        compiled = triton.compile(
            source,
            target=GPUTarget("cuda", capability, 32),
            options={"num_warps": config.num_warps, "num_stages": config.num_stages},
        )
        result.update(
            ok=True,
            shared=compiled.metadata.shared,
            wgmma="wgmma" in compiled.asm["ptx"],
            mma="mma" in compiled.asm["ptx"],
            cubin=len(compiled.asm["cubin"]) > 0,
            mma_instructions=sorted(
                set(re.findall(r"\b(?:wgmma\.mma_async|mma\.sync)[\w.]*", compiled.asm["ptx"]))
            ),
        )
    except Exception as error:  # reported to the test, which fails on it
        result.update(ok=False, error=f"{type(error).__name__}: {error}"[:2000])
    return result


def main():
    os.environ.pop("TRITON_INTERPRET", None)
    specs = json.load(sys.stdin)
    jobs = []
    for spec in specs:
        module_name, attr = spec["kernel"].split(":")
        kernel = getattr(importlib.import_module(module_name), attr)
        indices = spec.get("configs", range(len(kernel.configs)))
        jobs += [(spec, i, cap) for i in indices for cap in spec.get("targets", TARGETS)]
    workers = min(len(jobs), os.cpu_count() or 1) or 1
    with ProcessPoolExecutor(workers) as pool:
        results = list(pool.map(_compile, jobs))
    json.dump(results, sys.stdout)


if __name__ == "__main__":
    main()
