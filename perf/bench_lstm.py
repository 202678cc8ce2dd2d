"""Backward time of MeLSTM against nn.LSTM: ``triton_mebp.bench.lstm`` (also part of the sweep)."""

import sys

from triton_mebp.bench.lstm import main

if __name__ == "__main__":
    sys.exit(main())
