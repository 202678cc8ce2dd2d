"""Speedup, breakdown and roofline charts from the sweep CSV (see triton_mebp.plot)."""
import sys

from triton_mebp.plot import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
