"""triton_mebp: minimal-effort back propagation (meProp) and model simplification (meSimp).

Forward passes stay dense; backward passes keep only the top-k output gradients of each linear
layer, so only k rows of each weight take part and receive a gradient.
"""
from .backend import get_backend, set_backend
from .estimate import estimate_speedup, mebp_is_faster
from .functional import MebpLinearFunction, mebp_linear, resolve_k, sgd_step_rows
from .modules import MeLinear, convert
from .rnn import MeLSTM, mebp_lstm_layer
from . import optim
from .optim import RowAdagrad, RowAdam, RowAdamW, RowSGD

__all__ = ["MeLSTM", "MeLinear", "MebpLinearFunction", "RowAdagrad", "RowAdam", "RowAdamW", "RowSGD",
           "convert", "estimate_speedup", "get_backend", "mebp_is_faster", "mebp_linear", "mebp_lstm_layer", "optim", "resolve_k",
           "set_backend", "sgd_step_rows"]
__version__ = "0.1.0"
