"""Perf sweep: dense vs meProp timings into perf/results/ (see triton_mebp.sweep)."""
import sys

from triton_mebp.sweep import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
