"""Source checkouts: the kernels live in the top-level ``kernels/`` folder, which an install maps
to ``triton_mebp.kernels``. Imported first by the package, this makes the same name work from a
checkout without installing (``PYTHONPATH=.``), always taking the kernels beside this package."""

import importlib.util
import pathlib
import sys


def import_checkout_kernels() -> None:
    here = pathlib.Path(__file__).resolve().parent
    source = here.parent / "kernels" / "__init__.py"
    name = f"{__package__}.kernels"
    if (here / "kernels").is_dir() or not source.is_file() or name in sys.modules:
        return
    spec = importlib.util.spec_from_file_location(
        name, source, submodule_search_locations=[str(source.parent)]
    )
    if spec is None or spec.loader is None:
        raise ImportError(f"cannot import the checkout's kernels from {source}")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)


import_checkout_kernels()
