"""Perf sweep: dense vs meProp timings into perf/results/ (see triton_mebp.bench.sweep)."""

import sys

from triton_mebp.bench.sweep import main

if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
