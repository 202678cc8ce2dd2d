"""Autotuning with a switch: tuned on a GPU, the first pruned config in tests and the interpreter.

``TRITON_MEBP_AUTOTUNE=0`` turns tuning off; under ``TRITON_INTERPRET=1`` it is always off.
"""

import functools
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


PRODUCT_ROUTES = ("auto", "triton", "cublas")
GATHERED_PRODUCTS = ("dx", "dw")
# What "auto" takes: cuBLAS where the Triton kernel saves no copy (dW as k rows) or only the
# k x M gather of W's rows (dx); the Triton kernel where cuBLAS would add a k x M temporary and
# its scatter (dW into a dense gradient). A prediction until perf/gpu_kernels.py times both.
AUTO_ROUTES = {("dx", False): "cublas", ("dw", False): "cublas", ("dw", True): "triton"}


@functools.lru_cache(maxsize=16)
def _parse_products(value: str) -> dict:
    if value in PRODUCT_ROUTES:
        return dict.fromkeys(GATHERED_PRODUCTS, value)
    choices = dict.fromkeys(GATHERED_PRODUCTS, "auto")
    for part in value.split(","):
        product, _, route = part.strip().partition("=")
        if product not in GATHERED_PRODUCTS or route not in PRODUCT_ROUTES:
            raise ValueError(
                f"TRITON_MEBP_PRODUCTS must be one of {PRODUCT_ROUTES} or name a route per "
                f"product, e.g. 'dx=cublas,dw=triton' (products {GATHERED_PRODUCTS}), "
                f"got {value!r}"
            )
        choices[product] = route
    return choices


def product_route(product: str, scatter: bool = False) -> str:
    """``TRITON_MEBP_PRODUCTS``: "triton" or "cublas" for the unified backward's gathered
    ``product`` ("dx" or "dw"; ``scatter``: dW written into a dense gradient). "auto" (default)
    takes ``AUTO_ROUTES``; "triton"/"cublas" set both products, "dx=...,dw=..." each. Read at
    each call, so one process can time both routes."""
    route = _parse_products(os.environ.get("TRITON_MEBP_PRODUCTS", "auto"))[product]
    return AUTO_ROUTES[product, scatter and product == "dw"] if route == "auto" else route


def tma_enabled() -> bool:
    """``TRITON_MEBP_TMA``: "1" (default) lets the products read their dense operands through
    TMA descriptors where the device and the operands allow it; "0" keeps the pointer kernels.
    Read at each call, so one process can time both."""
    value = os.environ.get("TRITON_MEBP_TMA", "1")
    if value not in ("0", "1"):
        raise ValueError(f"TRITON_MEBP_TMA must be '0' or '1', got {value!r}")
    return value == "1"


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
    ``reset_to_zero`` names outputs accumulated with atomics. ``in_place`` names tensors the
    kernel updates in place: the first launch of a tuning key tunes on copies of them (trials
    and the tuner's own final run change the copies only, and no restoring copy sits in the
    timed region), then runs the chosen config once on the real tensors. Chosen configs are kept
    per key (the ``key`` arguments and the tensors' dtypes); later launches go straight to them.
    A config's ``pre_hook`` runs before each launch with it, tuned or not.
    """

    def __init__(self, fn, configs, key, prune=None, reset_to_zero=None, in_place=None):
        self.fn = fn
        self.configs = list(configs)
        self.prune = prune
        self.key = list(key)
        self.in_place = tuple(in_place or ())
        options = dict(key=key, reset_to_zero=reset_to_zero)
        if prune is not None:
            options["prune_configs_by"] = {
                "early_config_prune": lambda cfgs, nargs, **kw: prune(cfgs, nargs)
            }
        if _supports_cache_results():
            options["cache_results"] = True
        self.tuned = triton.autotune(self.configs, **options)(fn)
        self.chosen = {}
        self.last_config = None

    def pruned_configs(self, named_args):
        configs = self.prune(self.configs, named_args) if self.prune else self.configs
        if not configs:
            raise RuntimeError(f"{self.fn.__name__}: no autotune config fits this problem")
        return configs

    def _tuning_key(self, named_args):
        dtypes = tuple(str(v.dtype) for v in named_args.values() if hasattr(v, "dtype"))
        return tuple(named_args[name] for name in self.key) + dtypes

    def _tune(self, grid, args, kwargs, named_args):
        """Tunes (on copies of the in-place tensors); returns the chosen config."""
        scratch = {name: named_args[name].clone() for name in self.in_place}
        trial_args = [scratch.get(name, value) for name, value in zip(self.fn.arg_names, args)]
        trial_kwargs = {name: scratch.get(name, value) for name, value in kwargs.items()}
        self.tuned[grid](*trial_args, **trial_kwargs)
        return self.tuned.best_config

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            named_args = dict(zip(self.fn.arg_names, args))
            named_args.update(kwargs)
            if tuning_enabled():
                key = self._tuning_key(named_args)
                config = self.chosen.get(key)
                if config is None and not self.in_place:
                    result = self.tuned[grid](*args, **kwargs)  # tuned, then run once: done
                    self.chosen[key] = self.last_config = self.tuned.best_config
                    return result
                if config is None:
                    config = self.chosen[key] = self._tune(grid, args, kwargs, named_args)
            else:
                config = self.pruned_configs(named_args)[0]
            self.last_config = config
            if config.pre_hook is not None:  # e.g. TMA descriptors take the config's block shape
                config.pre_hook({**named_args, **config.all_kwargs()})
            return self.fn[grid](
                *args,
                **kwargs,
                **config.kwargs,
                num_warps=config.num_warps,
                num_stages=config.num_stages,
            )

        return launch


def config_label(config) -> str:
    """A short text form of a config, for the perf sweeps' CSV."""
    if config is None:
        return ""
    parts = [f"{k}={v}" for k, v in config.kwargs.items()]
    parts += [f"warps={config.num_warps}", f"stages={config.num_stages}"]
    return ",".join(parts)
