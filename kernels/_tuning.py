"""Autotuning with a switch: tuned on a GPU, the first pruned config in tests and the interpreter.

``TRITON_MEBP_AUTOTUNE=0`` turns tuning off; under ``TRITON_INTERPRET=1`` it is always off.
"""
import inspect
import os

import torch
import triton

from ..backend import interpreting

SMEM_LIMIT = 160 * 1024  # shared memory per program: below the 227 KiB of Hopper, 163 KiB of A100


def input_precision(dtype) -> str:
    """The dot precision matching PyTorch's matmul setting for the operands' dtype."""
    return "tf32" if dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32 else "ieee"


KERNEL_VERSIONS = ("v1", "v2")


def kernel_version() -> str:
    """``TRITON_MEBP_KERNELS``: "v2" (default) or "v1", the first kernels of the unified path
    (unpadded ``dy_c``, separate score and bias passes, 4-bit radix search), read at each call
    so that one process can time both."""
    version = os.environ.get("TRITON_MEBP_KERNELS", "v2")
    if version not in KERNEL_VERSIONS:
        raise ValueError(f"TRITON_MEBP_KERNELS must be one of {KERNEL_VERSIONS}, got {version!r}")
    return version


def tuning_enabled() -> bool:
    if interpreting():
        return False
    return os.environ.get("TRITON_MEBP_AUTOTUNE", "1") != "0"


def _supports_cache_results() -> bool:
    return "cache_results" in inspect.signature(triton.autotune).parameters


def pow2_bucket(n: int) -> int:
    """Autotune key bucket: the next power of two, so a training run does not re-tune each step."""
    return 1 << max(int(n) - 1, 0).bit_length()


class TunedKernel:
    """A ``@triton.jit`` kernel with its autotune config space and a launcher that may skip tuning.

    ``kernel[grid](*args, **kwargs)`` launches it; the config space is ``configs`` and the pruning
    function ``prune(configs, named_args)`` removes configs that do not suit the problem.
    ``reset_to_zero`` names outputs accumulated with atomics; ``restore_value`` names tensors the
    kernel updates in place, restored after each tuning trial so tuning applies the update once.
    """

    def __init__(self, fn, configs, key, prune=None, reset_to_zero=None, restore_value=None):
        self.fn = fn
        self.configs = list(configs)
        self.prune = prune
        options = dict(key=key, reset_to_zero=reset_to_zero, restore_value=restore_value)
        if prune is not None:
            options["prune_configs_by"] = {"early_config_prune": lambda cfgs, nargs, **kw: prune(cfgs, nargs)}
        if _supports_cache_results():
            options["cache_results"] = True
        self.tuned = triton.autotune(self.configs, **options)(fn)
        self.last_config = None

    def pruned_configs(self, named_args):
        configs = self.prune(self.configs, named_args) if self.prune else self.configs
        if not configs:
            raise RuntimeError(f"{self.fn.__name__}: no autotune config fits this problem")
        return configs

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            if tuning_enabled():
                result = self.tuned[grid](*args, **kwargs)
                self.last_config = self.tuned.best_config
                return result
            named_args = dict(zip(self.fn.arg_names, args))
            named_args.update(kwargs)
            config = self.pruned_configs(named_args)[0]
            self.last_config = config
            return self.fn[grid](*args, **kwargs, **config.kwargs,
                                 num_warps=config.num_warps, num_stages=config.num_stages)
        return launch


def config_label(config) -> str:
    """A short text form of a config, for the perf sweeps' CSV."""
    if config is None:
        return ""
    parts = [f"{k}={v}" for k, v in config.kwargs.items()]
    parts += [f"warps={config.num_warps}", f"stages={config.num_stages}"]
    return ",".join(parts)
