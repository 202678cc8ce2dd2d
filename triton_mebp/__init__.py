"""triton_mebp: minimal-effort back propagation (meProp) and model simplification (meSimp).

Forward passes stay dense; backward passes keep only the top-k output gradients of each linear
layer, so only k rows of each weight take part and receive a gradient.
"""

from . import _checkout  # noqa: F401  (first: triton_mebp.kernels in a source checkout)

# isort: split
from . import optim
from .backend import get_backend, set_backend
from .distributed import DistributedDataParallel, DistributedSimplifier
from .estimate import estimate_speedup, mebp_is_faster
from .functional import MebpLinearFunction, mebp_linear, resolve_k
from .inference import FusedLinear, FusedMLP, optimize_for_inference
from .modules import ConvertReport, MeLinear, convert
from .optim import RowAdagrad, RowAdam, RowAdamW, RowSGD, sgd_step_rows
from .rnn import MeLSTM, mebp_lstm_layer
from .simplify import PruneReport, Simplifier, SimplifySchedule, load_simplified, save_simplified
from .transformer import MeMultiheadAttention

__all__ = [
    "ConvertReport",
    "DistributedDataParallel",
    "DistributedSimplifier",
    "FusedLinear",
    "FusedMLP",
    "MeLSTM",
    "MeLinear",
    "MeMultiheadAttention",
    "MebpLinearFunction",
    "PruneReport",
    "RowAdagrad",
    "RowAdam",
    "RowAdamW",
    "RowSGD",
    "Simplifier",
    "SimplifySchedule",
    "convert",
    "estimate_speedup",
    "get_backend",
    "load_simplified",
    "mebp_is_faster",
    "mebp_linear",
    "mebp_lstm_layer",
    "optim",
    "optimize_for_inference",
    "resolve_k",
    "save_simplified",
    "set_backend",
    "sgd_step_rows",
]
__version__ = "0.1.0"
