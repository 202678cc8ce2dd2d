"""Triton kernels of triton_mebp: one module per kernel family, each with plain launchers.

Installed as ``triton_mebp.kernels``. Nothing here knows about autograd or ``nn.Module``.
"""
