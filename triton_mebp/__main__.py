"""``python -m triton_mebp COMMAND``: the ``mebp`` command-line application (triton_mebp.app)."""

import sys

from .app.cli import main

if __name__ == "__main__":
    sys.exit(main())
