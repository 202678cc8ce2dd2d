"""Speedup, breakdown and roofline charts from the sweep CSV (see triton_mebp.bench.plot)."""

import sys

from triton_mebp.bench.plot import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
