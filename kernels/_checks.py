"""Argument checks the launchers run before any kernel launch."""

import torch

# The floating dtypes every kernel computes correctly (float32 accumulation); float64 is not one
# of them: the matrix products accumulate in float32 and do not compile for float64 operands.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
INDEX_DTYPES = (torch.int32, torch.int64)


def check_dtypes(op: str, **tensors) -> None:
    """Raises a TypeError naming ``op`` and the argument whose dtype the kernels do not support.

    The arguments are tensors or, for an output's dtype, a ``torch.dtype`` (None: not given).
    Operands may differ in dtype (autocast: bf16 ``dy`` with a float32 weight)."""
    for name, tensor in tensors.items():
        dtype = tensor if isinstance(tensor, torch.dtype) or tensor is None else tensor.dtype
        if dtype is not None and dtype not in KERNEL_DTYPES:
            raise TypeError(
                f"{op}: {name} has dtype {dtype}; the Triton kernels support "
                f"{', '.join(str(d) for d in KERNEL_DTYPES)} (other dtypes run on the "
                "PyTorch backend: triton_mebp.set_backend('torch'))"
            )


def check_indices(op: str, **tensors) -> None:
    for name, tensor in tensors.items():
        if tensor is not None and tensor.dtype not in INDEX_DTYPES:
            raise TypeError(f"{op}: {name} must be int32 or int64 indices, got {tensor.dtype}")
