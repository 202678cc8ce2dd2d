"""Wrong calls of the public API that mypy must reject (`make types`; never run).

Each line carries the error code it must raise; with `warn_unused_ignores` mypy fails when one of
these calls stops being an error, i.e. when the annotation that catches it is lost.
"""

import torch
from torch import nn

import triton_mebp as mebp

x, weight = torch.randn(4, 8), torch.randn(16, 8)
linear = nn.Linear(8, 16)
model = nn.Sequential(linear, nn.ReLU(), nn.Linear(16, 2))

mebp.mebp_linear(x, weight, k="5%")  # type: ignore[arg-type]
mebp.mebp_linear(x, weight, k=4, mode=1)  # type: ignore[arg-type]
mebp.MeLinear(8, 16, k="5%")  # type: ignore[arg-type]
mebp.MeLinear.from_linear(linear, k=None)  # type: ignore[arg-type]
mebp.MeLinear.from_linear(model)  # type: ignore[arg-type]
mebp.convert(model, k=[4])  # type: ignore[arg-type]
mebp.convert("model")  # type: ignore[arg-type]
mebp.resolve_k(0.05, "16")  # type: ignore[arg-type]
mebp.Simplifier(model, threshold="0.1")  # type: ignore[arg-type]
mebp.estimate_speedup("256", 1024, 1024, 0.05)  # type: ignore[arg-type]
mebp.mebp_is_faster(256, 1024, 1024, k="5%")  # type: ignore[arg-type]
mebp.set_backend(1)  # type: ignore[arg-type]
mebp.optimize_for_inference("model")  # type: ignore[arg-type]
mebp.save_simplified(model, 3)  # type: ignore[arg-type]
mebp.RowAdam(model.parameters(), lr="1e-3")  # type: ignore[arg-type]
mebp.sgd_step_rows(model.parameters(), lr=None)  # type: ignore[arg-type]
